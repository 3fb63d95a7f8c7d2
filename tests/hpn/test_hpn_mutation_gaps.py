"""Gaps found by mutation testing of the HPN family: the semantic ranking term's two normalisations, the
normalisation of a prototype file whose rows are slightly off unit norm, the checkpoint's regression bounds replacing
a model's own, and the multi-task model's classification slice ``o[reg_dim:]``."""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from lightning_methods.hpn import HPNMultiTask, HPNRegressor
from lightning_methods.hpn.prototypes import load_prototypes, semantic_ranking_loss
from lightning_methods.losses.hpn import hpn_classification_loss, prototype_cosines

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps


def test_semantic_ranking_term_is_the_difference_of_two_means():
    """``-mean_{(i, j in N(i))} cos + mean_{(i, k in O(i))} cos``, each mean over its own pair count: K = 4 classes
    with 1 neighbour each (4 pairs) and 2 others each (8 pairs), against a loop in float64 (a few ulps)."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    near = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in ((0, 1), (1, 0), (2, 3), (3, 1)):
        near[i, j] = True
    others = ~near & ~torch.eye(4, dtype=torch.bool)
    cos = [[float(p[i] @ p[j]) for j in range(4)] for i in range(4)]
    near_pairs = [(i, j) for i in range(4) for j in range(4) if near[i, j]]
    other_pairs = [(i, k) for i in range(4) for k in range(4) if others[i, k]]
    assert (len(near_pairs), len(other_pairs)) == (4, 8)
    expected = (-sum(cos[i][j] for i, j in near_pairs) / 4 + sum(cos[i][k] for i, k in other_pairs) / 8)
    assert float(semantic_ranking_loss(p, near, others)) == pytest.approx(expected, rel=0, abs=32 * EPS64)


def test_a_prototype_file_slightly_off_unit_norm_is_normalised(tmp_path):
    """Rows off unit norm by more than 1e-4 (here 1e-3) are normalised with a warning, so every prototype has norm 1
    (to float32 rounding); rows within 1e-4 are kept as written, without a warning."""
    g = np.random.default_rng(0)
    rows = g.standard_normal((3, 4))
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    off = tmp_path / "off.npy"
    np.save(off, (unit * 1.001).astype(np.float32))
    with pytest.warns(UserWarning, match="not unit norm"):
        protos = load_prototypes(off, 3, 4)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(3), rtol=0, atol=8 * EPS32)
    close = tmp_path / "close.npy"
    np.save(close, unit.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = load_prototypes(close, 3, 4)
    assert np.array_equal(kept.numpy(), unit.astype(np.float32))


def test_checkpoint_bounds_replace_the_models_own():
    """A regressor built with other bounds that loads a checkpoint takes the checkpoint's (v_l, v_u), with a warning:
    its predictions map the cosine with the bounds it was trained with (cos 0 -> the midpoint 3.5 of [2, 5])."""
    model = HPNRegressor(backbone=nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), bounds=(0.0, 1.0))
    with pytest.warns(UserWarning, match="replace"):
        model.on_load_checkpoint({"hyper_parameters": {"bounds": [2.0, 5.0]}})
    assert model.bounds == (2.0, 5.0) and model.hparams.bounds == [2.0, 5.0]
    assert model.predict_values(torch.tensor([0.0])).item() == 3.5


def test_multitask_classification_uses_the_outputs_after_reg_dim():
    """``HPNMultiTask`` with reg_dim = 2 and D = 3 prototypes: the class terms use ``o[:, 2:]`` (not any other 3 of
    the 5 outputs), the regression term ``cos(o, e_1)`` on all of ``o``; same functions as the module: exact."""
    k, d, reg = 4, 3, 2
    model = HPNMultiTask(backbone=nn.Sequential(nn.Flatten(), nn.Linear(4, reg + d)), num_classes=k, prototype_dims=d,
                         reg_dim=reg, prototype_iterations=50, bounds=(0.0, 10.0), task_weight=0.25,
                         optimizer=partial(torch.optim.SGD, lr=0.1))
    g = torch.Generator().manual_seed(0)
    output = torch.randn(6, reg + d, generator=g)
    batch = {"target": torch.tensor([0, 1, 2, 3, 0, 1]), "regression_target": torch.rand(6, generator=g) * 10}
    losses = model.hpn_losses(output, batch)
    expected_c = hpn_classification_loss(output[:, reg:], model.prototypes, batch["target"], "none")
    torch.testing.assert_close(losses["loss_c"], expected_c, rtol=0, atol=0)
    torch.testing.assert_close(model.scores(output), prototype_cosines(output[:, reg:], model.prototypes),
                               rtol=0, atol=0)
    torch.testing.assert_close(losses["loss"], 0.25 * losses["loss_c"] + 0.75 * losses["loss_r"], rtol=0, atol=0)
