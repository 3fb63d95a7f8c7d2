"""HPN losses and predictions: golden values of the official training / test expressions (hpn_cifar.py,
hpn_omniart.py, models/cifar/resnet.py predict), and the spec's invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_methods.losses.hpn import (
    cosine_regression_loss,
    hpn_classification_loss,
    multitask_loss,
    predict_class,
    prototype_cosines,
    regression_cosine_target,
    regression_prediction,
    upper_pole_cosine,
)

# Official expressions run on these float64 inputs (generator seed 3: output (6, 4), prototypes (5, 4) normalised,
# then a (6, 5) multi-task output; years with bounds 1000 / 1932 as in hpn_omniart.py).
OFFICIAL = {
    "cls_loss": 9.701613609372137,
    "cls_grad_row0": [0.19664079479663535, -0.7048177627220275, 0.7753724067699153, 0.7247045748937028],
    "predict_scores_row0": [0.3833015496721677, -0.2762145765644343, -0.29131307525599887, 0.12100664490162369,
                            -0.545778672102501],
    "pred": [0, 4, 1, 4, 0, 1],
    "multitask": {0.0: 4.479263265524347, 0.25: 6.202498719763593, 0.5: 7.925734174002839, 1.0: 11.372205082481331},
    "reg_loss": 4.479263265524347,
    "cls_loss_47": 11.372205082481331,
    "mt_grad_row0_t025": [0.6894053329838283, -0.33745288457895284, -0.22468537541731798, 0.17115454862498108,
                          -0.28582922216996987],
    "year_pred": [1714.8512005281896, 1422.8553953746434, 1536.2319958476862, 1320.5788507890898, 1510.9168416262396,
                  1439.2141768013284],
}
YEARS = torch.tensor([1000.0, 1932.0, 1466.0, 1200.0, 1850.0, 1700.0], dtype=torch.float64)
TARGET = torch.tensor([0, 1, 2, 3, 4, 2])

# The official values are float64 losses over 6 rows of 4-5 features: per row a dot product, two norms, a division
# and a square, then the sum or mean: about 64 roundings, so a relative bound of 64 * eps64 = 1.4e-14 (libm and SIMD
# reduction orders differ between CPUs; a wrong formula is off by more than 1e-3).
LOSS_REL = 64 * torch.finfo(torch.float64).eps


def official_inputs():
    g = torch.Generator().manual_seed(3)
    output = torch.randn(6, 4, generator=g, dtype=torch.float64)
    protos = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    out47 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return output, protos, out47


def test_classification_loss_and_prediction_match_official():
    output, protos, _ = official_inputs()
    o = output.clone().requires_grad_(True)
    loss = hpn_classification_loss(o, protos, TARGET)  # sum reduction by default, as the official code
    loss.backward()
    assert float(loss.detach()) == pytest.approx(OFFICIAL["cls_loss"], rel=LOSS_REL)
    torch.testing.assert_close(o.grad[0], torch.tensor(OFFICIAL["cls_grad_row0"], dtype=torch.float64),
                               rtol=LOSS_REL, atol=LOSS_REL)
    scores = prototype_cosines(output, protos)
    torch.testing.assert_close(scores[0], torch.tensor(OFFICIAL["predict_scores_row0"], dtype=torch.float64),
                               rtol=LOSS_REL, atol=LOSS_REL)
    assert predict_class(output, protos).tolist() == OFFICIAL["pred"]


def test_multitask_and_regression_match_official():
    _, protos, out47 = official_inputs()
    r = regression_cosine_target(YEARS, 1000.0, 1932.0)
    for t, expected in OFFICIAL["multitask"].items():
        loss_m, loss_c, loss_r = multitask_loss(out47, protos, TARGET, r, task_weight=t)
        assert float(loss_m) == pytest.approx(expected, rel=LOSS_REL)
    assert float(loss_c) == pytest.approx(OFFICIAL["cls_loss_47"], rel=LOSS_REL)
    assert float(loss_r) == pytest.approx(OFFICIAL["reg_loss"], rel=LOSS_REL)
    assert float(cosine_regression_loss(out47, r)) == pytest.approx(OFFICIAL["reg_loss"], rel=LOSS_REL)
    o = out47.clone().requires_grad_(True)
    multitask_loss(o, protos, TARGET, r, task_weight=0.25)[0].backward()
    torch.testing.assert_close(o.grad[0], torch.tensor(OFFICIAL["mt_grad_row0_t025"], dtype=torch.float64),
                               rtol=LOSS_REL, atol=LOSS_REL)
    pred = regression_prediction(upper_pole_cosine(out47), 1000.0, 1932.0)
    torch.testing.assert_close(pred, torch.tensor(OFFICIAL["year_pred"], dtype=torch.float64), rtol=LOSS_REL, atol=0)


@pytest.mark.parametrize("c", [1e-3, 1.0, 37.0])
def test_classification_loss_zero_at_scaled_prototype(c):
    protos = F.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
    target = torch.tensor([3, 0, 6, 6])
    assert float(hpn_classification_loss(c * protos[target], protos, target)) == pytest.approx(0.0, abs=1e-25)
    assert float(hpn_classification_loss(-protos[target], protos, target)) == pytest.approx(4 * 4.0)  # (1 - -1)^2


def test_prediction_invariant_to_positive_rescaling():
    g = torch.Generator().manual_seed(1)
    protos = F.normalize(torch.randn(10, 6, generator=g, dtype=torch.float64), dim=1)
    output = torch.randn(32, 6, generator=g, dtype=torch.float64)
    scale = torch.rand(32, 1, generator=g, dtype=torch.float64) * 100 + 1e-3
    assert torch.equal(predict_class(output, protos), predict_class(scale * output, protos))
    torch.testing.assert_close(prototype_cosines(scale * output, protos), prototype_cosines(output, protos))


def test_prediction_on_toy_circle():
    """Four prototypes on the circle; outputs at hand-picked angles go to the nearest one."""
    angles = torch.tensor([0.0, 0.5, 1.0, 1.5]) * math.pi
    protos = torch.stack([angles.cos(), angles.sin()], 1)
    out_angles = torch.tensor([0.1, 0.45, 0.9, 1.3, 1.8, 1.95]) * math.pi
    output = 3 * torch.stack([out_angles.cos(), out_angles.sin()], 1)
    assert predict_class(output, protos).tolist() == [0, 1, 2, 3, 0, 0]


def test_regression_round_trip():
    lo, hi = 1000.0, 1932.0
    y = torch.tensor([1000.0, 1001.5, 1466.0, 1931.0, 1932.0], dtype=torch.float64)
    r = regression_cosine_target(y, lo, hi)
    assert r[0] == -1 and r[-1] == 1
    output = torch.stack([r, (1 - r**2).clamp_min(0).sqrt(), torch.zeros_like(r)], 1) * 5.0  # cos(o, e_1) = r
    torch.testing.assert_close(upper_pole_cosine(output), r, rtol=0, atol=1e-15)
    torch.testing.assert_close(regression_prediction(upper_pole_cosine(output), lo, hi), y, rtol=0, atol=1e-12)
    assert float(cosine_regression_loss(output, r)) == pytest.approx(0.0, abs=1e-25)


def test_out_of_bounds_targets_are_unreachable():
    """Documented: targets beyond the bounds map outside [-1, 1]; predictions saturate at the bounds."""
    r = regression_cosine_target(torch.tensor([900.0, 2000.0]), 1000.0, 1932.0)
    assert r[0] < -1 and r[1] > 1
    pred = regression_prediction(torch.tensor([-1.0, 1.0]), 1000.0, 1932.0)
    assert pred.tolist() == [1000.0, 1932.0]


def test_multitask_linear_in_t_with_endpoints():
    g = torch.Generator().manual_seed(4)
    protos = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    output = torch.randn(8, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (8,), generator=g)
    r = torch.rand(8, generator=g, dtype=torch.float64) * 2 - 1
    l_c = hpn_classification_loss(output[:, 1:], protos, target)
    l_r = cosine_regression_loss(output, r)
    assert float(multitask_loss(output, protos, target, r, 1.0)[0]) == pytest.approx(float(l_c), rel=LOSS_REL)
    assert float(multitask_loss(output, protos, target, r, 0.0)[0]) == pytest.approx(float(l_r), rel=LOSS_REL)
    values = [float(multitask_loss(output, protos, target, r, t)[0]) for t in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0)]
    for t, v in zip((0.0, 0.1, 0.25, 0.5, 0.9, 1.0), values, strict=True):
        assert v == pytest.approx(t * float(l_c) + (1 - t) * float(l_r), rel=LOSS_REL)
    out3 = torch.randn(8, 5, generator=g, dtype=torch.float64)  # reg_dim 2: classes on the last 3 values
    assert float(multitask_loss(out3, protos, target, r, 1.0, reg_dim=2)[0]) == pytest.approx(
        float(hpn_classification_loss(out3[:, 2:], protos, target)), rel=LOSS_REL)


def test_reductions_and_dtypes():
    protos = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(2)), dim=1)
    output = torch.randn(6, 3, generator=torch.Generator().manual_seed(3)).bfloat16()
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    per = hpn_classification_loss(output, protos, target, "none")
    assert per.shape == (6,) and per.dtype == torch.float32
    torch.testing.assert_close(hpn_classification_loss(output, protos, target, "sum"), per.sum())
    torch.testing.assert_close(hpn_classification_loss(output, protos, target, "mean"), per.mean())
    with pytest.raises(ValueError, match="reduction must be"):
        hpn_classification_loss(output, protos, target, "batchmean")


def test_bad_inputs():
    protos = F.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ValueError, match=r"must be \(batch, 3\)"):
        hpn_classification_loss(torch.randn(2, 5), protos, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="task_weight t must be in"):
        multitask_loss(torch.randn(2, 4), protos, torch.tensor([0, 1]), torch.zeros(2), task_weight=1.5)
    with pytest.raises(ValueError, match="task_weight t must be in"):
        multitask_loss(torch.randn(2, 4), protos, torch.tensor([0, 1]), torch.zeros(2), task_weight=-0.1)
    with pytest.raises(ValueError, match="lower < upper"):
        regression_cosine_target(torch.zeros(2), 5.0, 5.0)
    with pytest.raises(ValueError, match="D >= 2"):
        upper_pole_cosine(torch.randn(3, 1))
