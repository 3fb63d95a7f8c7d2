"""tests/core/test_configs.py hook for configs/imagenet/: the ``fit`` configs run with fast_dev_run on tiny trees
written in the real on-disk formats (ILSVRC2012 class folders of real JPEG files, the Tiny-ImageNet release layout);
the Early Cutting ``select`` configs and the FedFree ``fed`` config are covered by
tests/imagenet/test_imagenet_configs.py.

Swaps (printed in the session summary): 224 px -> 32 px crops (evaluation resize 36; 64 / 72 for SSAM-F, whose batch-1
Fisher forwards need ResNet-50's last map larger than 1x1) and 1000 -> 4 classes (the tiny tree), the ViT's position
embeddings for 32 px, the distillation teacher's torchvision weights -> a random-weight file of the same architecture in
torchvision's format (a plain state dict), SSAM's 128 Fisher samples -> 4, HPN's 10,000 prototype steps -> 50, and for
the multi-bit configs (quantizing the weights dominates the CPU time) bits [1, 2, 4, 8, 32] -> [2, 32] and ResNet-50 ->
ResNet-18 (ResNet-50's conversion is tested in test_imagenet_models.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import yaml

from config_overrides import note_swap, register


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_tree = _load("imagenet_tiny_tree", "imagenet/imagenet_tiny_tree.py")
_tiny = _load("vit_locality_tiny_files_for_imagenet", "vit_locality/vit_locality_tiny_files.py")

CLASSES = 4
_TEACHERS: dict[str, Path] = {}
IMAGE, RESIZE = 32, 36
#: SSAM-F configs: ResNet-50's last feature map is 2x2 at 64 px (1x1 at 32 px, where BatchNorm in train mode on one
#: Fisher sample sees a single value per channel and stops)
FISHER_IMAGE, FISHER_RESIZE = 64, 72
#: select / fed configs of configs/imagenet/ (not ``fit`` configs)
NOT_FIT = {
    "selection": "lightning-methods-select config: covered by tests/imagenet/test_imagenet_configs.py::"
    "test_select_configs_instantiate and ::test_select_config_runs_end_to_end",
    "federation": "lightning-methods-fed config: covered by tests/imagenet/test_imagenet_configs.py::"
    "test_fed_config_first_round",
}


def write_teacher(folder: Path, name: str, num_classes: int) -> Path:
    """A teacher file as torchvision publishes its weights: a plain state dict (random weights, seeded)."""
    from lightning_methods.models import create_backbone

    torch.manual_seed(0)
    path = folder / f"{name}-{num_classes}.pth"
    torch.save(create_backbone(name, num_classes).state_dict(), path)
    return path


@register("imagenet/")
def imagenet_hook(config_path: Path, tmp_path: Path, data_root: Path) -> list[str] | None:
    rel = "imagenet/" + config_path.name
    cfg = yaml.safe_load(config_path.read_text())
    if any(key in cfg for key in NOT_FIT):
        return None
    data_cls = cfg["data"]["class_path"].rsplit(".", 1)[-1]
    model = cfg["model"]["init_args"]
    args: list[str] = []
    callbacks = [cb["class_path"].rsplit(".", 1)[-1] for cb in (cfg.get("trainer") or {}).get("callbacks") or []]
    image, resize = IMAGE, RESIZE
    if "SSAMMaskCallback" in callbacks:  # the Fisher pass runs batch-1 forwards in train mode: BatchNorm needs more
        image, resize = FISHER_IMAGE, FISHER_RESIZE  # than one value per channel (a 1x1 last map at 32 px)
    if data_cls == "TinyImageNetDataModule":
        _tiny.write_fake_tinyimagenet(tmp_path / "tiny", per_class=2, n_val=6)
        args.append(f"--data.init_args.data_dir={tmp_path / 'tiny'}")
    else:
        root = _tree.write_imagenet_tree(tmp_path / "imagenet", classes=CLASSES, per_class=3, val_per_class=2)
        args += [f"--data.init_args.data_dir={root}", "--data.init_args.eval_batch_size=4"]
        if data_cls == "ImageNet200DataModule":
            wnids = _tree.write_class_list(tmp_path / "wnids.txt", [_tree.wnid(c) for c in range(CLASSES)])
            args.append(f"--data.init_args.classes_file={wnids}")  # sets num_classes (4)
            note_swap(rel, "ImageNet-200 classes file -> the tiny tree's 4 wnids")
        else:
            args += [
                f"--data.init_args.num_classes={CLASSES}",
                f"--data.init_args.image_size={image}",
                f"--data.init_args.eval_resize={resize}",
            ]
            note_swap(rel, f"ILSVRC2012 -> tiny tree ({CLASSES} classes), crops 224 -> {image} px")
    if "vit" in model["backbone"] or "deit" in model["backbone"]:
        args.append(f'--model.init_args.backbone_kwargs={{"img_size": {IMAGE}}}')
        note_swap(rel, f"ViT position embeddings for {IMAGE} px")
    if model.get("teacher"):
        teacher = _TEACHERS.get(model["teacher"])
        if teacher is None or not teacher.is_file():  # one file per architecture and test session
            teacher = _TEACHERS[model["teacher"]] = write_teacher(tmp_path, model["teacher"], CLASSES)
        args.append(f"--model.init_args.teacher_checkpoint={teacher}")
        note_swap(rel, "teacher torchvision weights -> a random-weight file in torchvision's format")
    if "bits" in model:  # the quantized weights dominate the CPU time: 2 bit-widths instead of 5
        args += ["--model.init_args.bits=[2, 32]", "--model.init_args.eval_bits=[2, 32]"]
        note_swap(rel, "bits [1, 2, 4, 8, 32] -> [2, 32]")
        if model["backbone"] == "imagenet_resnet50":
            args.append("--model.init_args.backbone=imagenet_resnet18")
            note_swap(
                rel,
                "backbone imagenet_resnet50 -> imagenet_resnet18 (ResNet-50's conversion: "
                "tests/imagenet/test_imagenet_models.py)",
            )
    if "prototype_iterations" in model:
        args.append("--model.init_args.prototype_iterations=50")
        note_swap(rel, "prototype_iterations 10000 -> 50")
    if "SSAMMaskCallback" in callbacks:
        args.append("--trainer.callbacks.init_args.num_samples=4")
        note_swap(rel, f"SSAM Fisher samples 128 -> 4 (batch-1 forwards: {FISHER_IMAGE} px crops, a 2x2 last map)")
    return args


imagenet_hook.reason = "select / fed config: covered by tests/imagenet/test_imagenet_configs.py"
