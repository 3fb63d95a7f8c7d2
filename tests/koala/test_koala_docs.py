"""docs/methods/koala.md says what a user can run: its Python snippet's imports work, the files it names exist, and
its claim about zero losses holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_methods.optim import KOALAV

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "methods" / "koala.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_usage_snippet_imports_resolve():
    imports = [line for block in python_blocks(DOC.read_text()) for line in block.splitlines()
               if re.match(r"(from \S+ )?import ", line)]
    assert any("KOALAMonitor" in line for line in imports)  # the snippet this test guards
    namespace: dict = {}
    for line in imports:
        exec(line, namespace)  # an ImportError names the broken line
    assert namespace["KOALAMonitor"].__module__ == "lightning_methods.callbacks.koala_monitor"


def test_named_test_files_exist():
    named = set(re.findall(r"`(tests/[\w/]+\.py)`", DOC.read_text()))
    assert named, "the doc names its test files"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"docs/methods/koala.md names test files that do not exist: {missing}"


@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_zero_loss_step_vanishes_only_without_weight_decay(wd):
    # "A zero loss gives a zero step only with weight_decay=0": KOALA-V's first step in float64, closed form
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    w0 = p.detach().clone()
    g = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    opt = KOALAV([p], lr=1.0, sigma=0.1, q=0.01, weight_decay=wd)

    def closure():
        opt.zero_grad()
        (p * g).sum().backward()
        return torch.zeros(4, dtype=torch.float64)  # per-sample losses, all zero

    opt.step(closure)
    p_hat = 0.1 + 0.01  # P_0 + q
    r = 0.9 * 1.0 + 0.1 * 0.0  # R <- alpha_r R_0 + (1 - alpha_r) mean(l^2)
    h = g + wd * w0
    tensor_loss = 0.0 + 0.5 * wd * w0.dot(w0)
    expected = w0 - tensor_loss * p_hat / (p_hat * h.dot(h) + r) * g  # direction "grad" (official)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0)
    assert torch.equal(p.detach(), w0) == (wd == 0.0)
