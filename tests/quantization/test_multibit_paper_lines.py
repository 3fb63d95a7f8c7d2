"""The CIFAR-10 configs whose paper numbers docs/methods/quantization.md and README.md quote carry them on their
``# paper:`` header line, which ``lightning-methods table`` and ``list`` read; every CIFAR config holds the spec's
recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_methods.results.aggregate import paper_numbers

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "quantization"

ANY_PRECISION = {1: 91.89, 2: 93.90, 4: 93.86, 8: 93.75, 32: 94.11}  # official README, ResNet-20x5, CIFAR-10


@pytest.mark.parametrize(("config", "expected"), [
    ("cifar10_resnet20x5_anyprecision.yaml", {f"test/acc_bit{b}": v for b, v in ANY_PRECISION.items()}),
    ("cifar10_resnet20x5_emq.yaml", {"test/acc": 93.46}),
])
def test_paper_lines_hold_the_documented_numbers(config, expected):
    assert paper_numbers(CONFIGS / config) == pytest.approx(expected, abs=0)


def test_the_documented_numbers_are_the_docs():
    doc = (CONFIGS.parents[1] / "docs" / "methods" / "quantization.md").read_text()
    assert " / ".join(f"{v:.2f}" for v in ANY_PRECISION.values()) in doc
    assert "93.46" in doc


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("cifar*_resnet20x5_*.yaml")))
def test_cifar_configs_hold_the_spec_recipe(config):
    """Spec (multibit_quant.md, Hyperparameters): bits 1, 2, 4, 8, 32 trained, 3, 5, 6, 7 calibrated; Adam lr 1e-3,
    wd 0; x0.1 at 100 / 150 / 180; 200 epochs; batch 128; ResNet-20x5; WBC eps 1e-8. Any-Precision (and its LSQ
    variant): switchable BN, recursive supervision. EMQ: WBC + shared BN, coresets p = 0.8 (0.6 in the _p06 configs),
    refresh every 10 epochs, 1 warm-up epoch, EL2N, dataloaders reloaded every epoch."""
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    init = cfg["model"]["init_args"]
    assert init["backbone"] == "resnet20x5" and init["bits"] == [1, 2, 4, 8, 32]
    assert {3, 5, 6, 7} <= set(init["eval_bits"]) and init["wbc_eps"] == 1e-8
    assert init["optimizer"]["class_path"] == "torch.optim.Adam"
    assert init["optimizer"]["init_args"] == {"lr": 1e-3, "weight_decay": 0.0}
    assert init["lr_scheduler"]["init_args"] == {"milestones": [100, 150, 180], "gamma": 0.1}
    assert cfg["trainer"]["max_epochs"] == 200 and cfg["data"]["init_args"]["batch_size"] == 128
    coresets = [c["init_args"] for c in cfg["trainer"].get("callbacks") or []
                if c["class_path"].endswith("BitwiseCoresetCallback")]
    if "anyprecision" in config or "lsq" in config:
        assert (init["shared_bn"], init["wbc"], init["supervision"]) == (False, False, "recursive") and not coresets
        return
    assert (init["shared_bn"], init["wbc"]) == (True, True)
    if "full" in config:
        assert not coresets
        return
    (coreset,) = coresets
    assert coreset["prune_rate"] == (0.6 if "p06" in config else 0.8)
    assert (coreset["refresh_every"], coreset["warmup_full"], coreset["score"]) == (10, 1, "el2n")
    assert cfg["trainer"]["reload_dataloaders_every_n_epochs"] == 1
