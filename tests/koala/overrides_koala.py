"""Config smoke-test hook for configs/koala/: smaller backbones of the same families.

One fast_dev_run of ResNet-50 or WRN-50-2 at 32x32 takes well over 5 s on a 2-core CPU (about 25 s measured for
ResNet-50), so the smoke test swaps in a smaller member of each family: ResNet-18 for ResNet-50 (both
``lightning_methods.models.resnet.ResNet`` with the CIFAR stem) and a one-block-per-stage, width-x1
``WideResNet50`` for WRN-50-2 (same class, same stem). Everything else in the config (optimizer, scheduler,
callbacks, data) runs as shipped; tests/test_koala_wrn50.py checks the full WRN-50-2 architecture.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from config_overrides import note_swap, register


@register("koala/")
def koala_hook(config: Path, tmp_path: Path, data_root: Path) -> list[str]:
    backbone = yaml.safe_load(config.read_text())["model"]["init_args"]["backbone"]
    rel = f"koala/{config.name}"
    if backbone == "resnet50":
        note_swap(rel, "backbone resnet50 -> resnet18")
        return ["--model.init_args.backbone=resnet18"]
    if backbone == "wrn_50_2":
        note_swap(rel, "backbone wrn_50_2 -> WideResNet50 with one block per stage, width x1")
        return ['--model.init_args.backbone_kwargs={"layers": [1, 1, 1, 1], "width_factor": 1}']
    return []
