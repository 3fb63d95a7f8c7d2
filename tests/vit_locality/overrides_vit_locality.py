"""tests/core/test_configs.py hook for configs/vit_locality/: every file is a ``fit`` config and runs with
fast_dev_run.

``cifar100_modern.yaml`` runs with its real ViT-Lite-7/4; the others swap in a 2-block, 32-wide ViT with the same
patch size and token grid (the full ViT-Lite is also covered by tests/vit_locality/test_vit_locality_model.py). The
locality probe is shrunk to the small fake test set, and the Tiny-ImageNet configs read a small release written in
the official folder layout.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from config_overrides import note_swap, register

_spec = importlib.util.spec_from_file_location("vit_locality_tiny_files", Path(__file__).with_name(
    "vit_locality_tiny_files.py"))
_files = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_files)  # type: ignore[union-attr]

REAL_BACKBONE = "vit_locality/cifar100_modern.yaml"


@register("vit_locality/")
def vit_locality_hook(config_path: Path, tmp_path: Path, data_root: Path) -> list[str]:
    rel = "vit_locality/" + config_path.name
    cfg = yaml.safe_load(config_path.read_text())
    args = ["--trainer.callbacks.init_args.settings.num_images=8", "--trainer.callbacks.init_args.num_map_images=1"]
    note_swap(rel, "locality probe 1000 -> 8 images")
    if rel != REAL_BACKBONE:
        args.append('--model.init_args.backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}')
        note_swap(rel, "ViT-Lite width 256 / depth 7 / 4 heads -> 32 / 2 / 2 (same patch size and grid)")
    if cfg["data"]["class_path"].endswith("TinyImageNetDataModule"):
        _files.write_fake_tinyimagenet(tmp_path / "tiny", per_class=2, n_val=10)
        args.append(f"--data.init_args.data_dir={tmp_path / 'tiny'}")
    return args
