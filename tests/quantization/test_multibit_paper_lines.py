"""The CIFAR-10 configs whose paper numbers docs/methods/quantization.md and README.md quote carry them on their
``# paper:`` header line, which ``lightning-methods table`` and ``list`` read."""

from __future__ import annotations

from pathlib import Path

import pytest

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
