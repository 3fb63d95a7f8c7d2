"""tests/test_configs.py hook for configs/sam/ (60 files: 15 variants x 2 backbones x {basic, AutoAugment}).

Every file is fitted with ``fast_dev_run``: one with its real backbone (ResNet-56), the others with ResNet-8 swapped
in to keep the suite fast (WRN-28-10 itself runs in configs/cifar100/wrn28_10.yaml, and tests/test_sam_configs.py
checks each file's backbone, hyperparameters and per-variant rho)."""

from __future__ import annotations

from pathlib import Path

from config_overrides import note_swap, register

FITTED = {
    "sam/cifar100_resnet56_samon.yaml",
    "sam/cifar100_resnet56_asamon_elementwise.yaml",
    "sam/cifar100_resnet56_asam_layerwise.yaml",
    "sam/cifar100_resnet56_ssamf.yaml",
    "sam/cifar100_resnet56_ssamd.yaml",
    "sam/autoaugment/cifar100_resnet56_asam_elementwise_nonorm.yaml",
}
REAL_BACKBONE = "sam/cifar100_resnet56_samon.yaml"


@register("sam/")
def sam_on_args(config_path: Path, tmp_path: Path, data_root: Path) -> list[str] | None:
    rel = "sam/" + config_path.as_posix().split("/configs/sam/", 1)[1]
    # one file runs with its real backbone; the others swap in the smallest CIFAR ResNet to keep the suite fast
    args = [] if rel == REAL_BACKBONE else ["--model.init_args.backbone=resnet8"]
    if args:
        note_swap(rel, "backbone -> resnet8")
    if rel.endswith("_ssamf.yaml"):
        args.append("--trainer.callbacks.init_args.num_samples=4")  # 128 single-sample passes are slow on a CPU
        note_swap(rel, "SSAM-F Fisher num_samples -> 4")
    return args

