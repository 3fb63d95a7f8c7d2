"""Gaps found by mutation testing of the OOD family."""

from __future__ import annotations

import pytest
import torch
from ood_helpers import TINY_RDM

from lightning_methods.ood import rdm as rdm_module
from lightning_methods.ood.metrics import aupr
from lightning_methods.ood.rdm import RDMModule


def test_aupr_starts_at_precision_one_even_with_a_tie_at_the_top():
    """scikit-learn's PR curve (which OpenOOD integrates) ends at (recall 0, precision 1) whatever the precision of
    the highest threshold; with positives [1, 1, 0.5] and negatives [1, 0.2] the top threshold (1) holds a tie,
    precision 2/3 at recall 2/3. The curve (0, 1), (2/3, 2/3), (1, 3/4), (1, 3/5) has the trapezoidal area
    2/3 (1 + 2/3) / 2 + 1/3 (2/3 + 3/4) / 2 = 5/9 + 17/72 = 57/72 (starting at the top point's precision instead
    would give 49/72). A few float64 operations: 1e-15."""
    assert aupr([1.0, 1.0, 0.5], [1.0, 0.2]) == pytest.approx(57 / 72, abs=1e-15)


def test_rdm_training_times_are_drawn_from_t_eps_to_t(monkeypatch):
    """The DSM loss is evaluated at times ``t ~ U(t_eps, T)`` (score_sde / RDM code: ``rand * (T - eps) + eps``):
    with the generator replayed, the times handed to the loss are exactly ``u (T - t_eps) + t_eps`` for the uniform
    draws ``u``, so none lies below ``t_eps`` (here 0.5, large enough to see)."""
    seen = []
    real = rdm_module.dsm_loss
    monkeypatch.setattr(rdm_module, "dsm_loss", lambda net, sde, x, t, noise, **kw: seen.append(t) or
                        real(net, sde, x, t, noise, **kw))
    model = RDMModule(dim=2, net=TINY_RDM, training={"t_eps": 0.5})
    model.loss({"feature": torch.zeros(64, 2)}, torch.Generator().manual_seed(3))
    u = torch.rand(64, generator=torch.Generator().manual_seed(3))
    (t,) = seen
    # float32: u (T - eps) + eps has two roundings of values below 1: 2 ulps of 1.0
    assert torch.allclose(t, u * 0.5 + 0.5, rtol=0, atol=2 * torch.finfo(torch.float32).eps)
    assert float(t.min()) >= 0.5
