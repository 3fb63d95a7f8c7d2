"""The ViT-locality spec's defaults (shared/specs/vit_locality.md, "Hyperparameters" and "Attention extraction"),
read from the code's signatures and the Modern CIFAR-100 config (no training)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from lightning_methods.analysis.attention import attention_locality, locality_summary, patch_attention
from lightning_methods.callbacks import AttentionLocality
from lightning_methods.vit_locality import ViTLocalityClassifier
from lightning_methods.vit_locality.settings import LocalitySettings

from helpers import signature_defaults

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "vit_locality"


def test_code_defaults_are_the_spec_table():
    s = {f.name: f.default for f in fields(LocalitySettings)}
    assert (s["num_images"], s["split"], s["include_cls"], s["renormalize"], s["max_early_layer"]) == (
        1000, "test", False, True, 2)
    for fn in (patch_attention, attention_locality):
        assert (signature_defaults(fn)["include_cls"], signature_defaults(fn)["renormalize"]) == (False, True)
    assert signature_defaults(locality_summary)["max_early_layer"] == 2
    cb = signature_defaults(AttentionLocality.__init__)
    assert (cb["every_n_epochs"], cb["heatmap_norm"]) == (10, "grid")
    assert signature_defaults(ViTLocalityClassifier.__init__)["backbone"] == "vit_lite_7_4"


def test_modern_config_is_the_spec_protocol():
    cfg = yaml.safe_load((CONFIGS / "cifar100_modern.yaml").read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert (data["augment"], data["cutmix_alpha"], model["label_smoothing"]) == ("autoaugment", 1.0, 0.1)
    assert model["optimizer"]["init_args"] == {"lr": 5.0e-4, "weight_decay": 0.05} and data["batch_size"] == 128
    assert model["lr_scheduler"]["init_args"] == {"warmup_iters": 10, "max_iters": 200}
    assert cfg["trainer"]["max_epochs"] == 200 and model["backbone"] == "vit_lite_7_4"
    (probe,) = cfg["trainer"]["callbacks"]
    assert probe["init_args"]["every_n_epochs"] == 10 and probe["init_args"]["settings"]["num_images"] == 1000
