"""Gaps found by mutation testing of the multi-bit quantization family: the DoReFa weight gradient through
max|tanh(w)|, WBC's differentiable statistics, the signed activation grid, LSQ's nearest learned step and the
activation step's gradient scale, a recalibration that starts from used statistics, which bit-widths "untrained"
recalibrates, GraNd without a bias, the stratified quotas' largest remainder, the score EMA's weight, per-bit random
draws and a changed prune rate on resume."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from multibit_helpers import TinyImages, tiny_model
from torch import nn

from lightning_methods.callbacks import BitwiseCoresetCallback
from lightning_methods.layers import (
    QuantConv2d,
    QuantLinear,
    lsq_levels,
    lsq_quantize,
    quantize_activation,
    quantize_weight,
    weight_bias_correction,
)
from lightning_methods.quantization import grand_last_layer_scores, recalibrate_bn, select_coreset

from helpers import quiet_trainer

EPS = np.finfo(np.float64).eps


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_weight_gradient_flows_through_the_tanh_maximum(bits):
    """Official ``quan_ops``: ``tanh(w) / max|tanh(w)|`` is not detached (only E = mean|w| is), and the STE makes the
    k-bit gradient that of ``E tanh(w) / m`` (d w_q / d unit = 2E, d unit / d w = d (t / 2m) / d w). With
    f = sum c_i w_q,i the analytic gradient is ``c_i sech^2(w_i) E / m - [i = a] s sech^2(w_a) E / m^2 sum c_j t_j``
    (a the arg-max of |t|, s its sign). float64: a few roundings per term of size <= |c| E / m (sum: N terms),
    so 64 N eps relative to the largest term bounds both sides' difference."""
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.7).requires_grad_(True)
    c = torch.randn(6, 5, generator=g, dtype=torch.float64)
    (quantize_weight(w, bits) * c).sum().backward()
    wd = w.detach()
    t, e = torch.tanh(wd), wd.abs().mean()
    a = int(t.abs().argmax())
    m, s = t.abs().flatten()[a], torch.sign(t.flatten()[a])
    sech2 = 1 - t**2
    expected = c * sech2 * e / m
    expected.view(-1)[a] -= s * sech2.flatten()[a] * e / m**2 * (c * t).sum()
    scale = float((c.abs() * e / m).max() * (1 + (c * t).abs().sum() / m))
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=64 * w.numel() * EPS * scale)


def test_wbc_gradient_includes_both_standard_deviations():
    """Spec (WBC): "the statistics are differentiable": the gradient of sum(c * WBC(q, w)) w.r.t. q and w equals the
    central finite difference in float64. Step h = 1e-6: truncation O(h^2 f''') ~ 1e-12, round-off ~ eps |f| / h
    ~ 1e-9 (|f| ~ 10), so 1e-6 separates a right gradient from one that misses the ratio's derivative (O(0.1))."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    c = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)

    def f(q_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return (c * weight_bias_correction(q_, w_)).sum()

    f(q, w).backward()
    h = 1e-6
    for x, grad, which in ((q, q.grad, 0), (w, w.grad, 1)):
        numeric = torch.zeros_like(x)
        for i in range(x.numel()):
            d = torch.zeros_like(x).view(-1)
            d[i] = h
            d = d.view_as(x)
            args_p = (q.detach() + d, w.detach()) if which == 0 else (q.detach(), w.detach() + d)
            args_m = (q.detach() - d, w.detach()) if which == 0 else (q.detach(), w.detach() - d)
            numeric.view(-1)[i] = (f(*args_p) - f(*args_m)) / (2 * h)
        torch.testing.assert_close(grad, numeric, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_signed_activations_use_the_symmetric_grid_on_minus_one_to_one(bits):
    """``"signed"``: clamp to [-1, 1] and round to the 2^k levels ``-1 + 2j / (2^k - 1)``; the STE passes the gradient
    inside (-1, 1) and blocks it outside. Inputs are chosen away from rounding midpoints."""
    n = 2**bits - 1
    levels = -1 + 2 * torch.arange(n + 1, dtype=torch.float64) / n
    x = torch.cat([torch.tensor([-3.0, -1.5, 1.5, 3.0], dtype=torch.float64), levels * 0.999 + 0.0004])
    x.requires_grad_(True)
    out = quantize_activation(x, bits, "signed")
    out.sum().backward()
    assert out[:2].tolist() == [-1.0, -1.0] and out[2:4].tolist() == [1.0, 1.0]
    torch.testing.assert_close(out[4:].detach(), levels, rtol=0, atol=4 * EPS)
    assert x.grad[:4].tolist() == [0.0] * 4 and x.grad[4:].tolist() == [1.0] * (n + 1)


def test_an_untrained_bit_width_uses_the_nearest_learned_step_above():
    """With learned steps at 2, 4 and 8 bits, 3 bits uses the 4-bit step (the nearest above, not the highest),
    rescaled to keep its clip range: s_3 = s_4 Q_P(4) / Q_P(3) (weights: 7 / 3, inputs: 15 / 7)."""
    torch.manual_seed(0)
    layer = QuantLinear(5, 3, quantizer="lsq", lsq_bits=[2, 4, 8]).double()
    x = torch.rand(4, 5, dtype=torch.float64)
    for bits in (2, 4, 8):
        layer.bits = bits
        layer(x)
    with torch.no_grad():  # distinct steps, so the owner is visible in the output
        layer.weight_step["4"].mul_(1.3)
        layer.act_step["4"].mul_(0.7)
    layer.bits = 3
    s_w = layer.weight_step["4"].item() * 7 / 3
    s_a = layer.act_step["4"].item() * 15 / 7
    w_hat = lsq_quantize(layer.weight, torch.tensor(s_w, dtype=torch.float64), 3, True)
    x_hat = lsq_quantize(x, torch.tensor(s_a, dtype=torch.float64), 3, False)
    torch.testing.assert_close(layer(x), F.linear(x_hat, w_hat, layer.bias), rtol=64 * EPS, atol=64 * EPS)


def test_the_activation_step_gradient_is_scaled_by_the_features_of_one_sample():
    """LSQ's g = 1 / sqrt(N Q_P) with N the number of features of ONE sample (not of the batch): for a batch of 5
    samples of 6 features at 4 bits (unsigned, Q_P = 15) the input step's gradient is eq. 3 summed over the batch
    times 1 / sqrt(6 * 15). Same operations as the reference up to a few float64 roundings per term."""
    torch.manual_seed(0)
    layer = QuantLinear(6, 3, quantizer="lsq", lsq_bits=[4]).double()
    layer.bits = 4
    x = torch.rand(5, 6, dtype=torch.float64) * 2
    layer(x).sum().backward()
    s = layer.act_step["4"].item()
    w_hat = lsq_quantize(layer.weight.detach(), layer.weight_step["4"].detach(), 4, True)
    upstream = (torch.ones(5, 3, dtype=torch.float64) @ w_hat).numpy()  # d sum(y) / d x_hat
    r = x.numpy() / s
    q_p = lsq_levels(4, False)[1]
    ds = np.where(r >= q_p, q_p, np.where(r <= 0, 0.0, np.round(np.clip(r, 0, q_p)) - r))
    expected = (upstream * ds).sum() / (6 * q_p) ** 0.5
    assert layer.act_step["4"].grad.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_recalibration_discards_the_statistics_training_left():
    """Spec test 4 from used statistics: a BatchNorm that has tracked batches before still ends with running_mean
    equal to the mean over the calibration batches of the per-batch means (the reset comes first; without it the
    cumulative average would continue from the old count). float64, 3 batches: a few ulps."""
    torch.manual_seed(0)
    conv = QuantConv2d(2, 3, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.BatchNorm2d(3)).double()
    model.train()
    with torch.no_grad():
        for _ in range(4):  # training leaves stats and num_batches_tracked = 4
            model(torch.randn(5, 2, 4, 4, dtype=torch.float64) * 3 + 2)
    bn = model[1]
    batches = [torch.rand(5, 2, 4, 4, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        conv.bits = 4
        pre = [conv(x) for x in batches]
        conv.bits = 32
    recalibrate_bn(model, 4, batches, n_batches=3)
    means = torch.stack([p.mean(dim=(0, 2, 3)) for p in pre]).mean(0)
    variances = torch.stack([p.transpose(0, 1).flatten(1).var(dim=1) for p in pre]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=0, atol=64 * EPS)
    torch.testing.assert_close(bn.running_var, variances, rtol=1e-12, atol=64 * EPS)
    assert int(bn.num_batches_tracked) == 3


@pytest.mark.parametrize(("mode", "expected"), [("untrained", [3]), ("all", [1, 3, 32]), ("none", [])])
def test_which_bit_widths_are_recalibrated_before_validation(mode, expected, one_thread, monkeypatch):
    """``bn_recalibration="untrained"`` recalibrates only the evaluated bit-widths that were not trained (3 here),
    ``"all"`` every evaluated one, ``"none"`` none."""
    import lightning_methods.quantization.evaluation as evaluation

    calls = []
    original = evaluation.recalibrate_bn

    def recording(model, bits, batches, n_batches=50):
        calls.append(bits)
        return original(model, bits, batches, n_batches)

    monkeypatch.setattr(evaluation, "recalibrate_bn", recording)
    model = tiny_model(bits=[1, 32], eval_bits=[1, 3, 32], bn_recalibration=mode, shared_bn=False)
    quiet_trainer(limit_val_batches=1).validate(model, TinyImages(), verbose=False)
    assert calls == expected


def test_grand_without_a_bias_is_the_norm_of_the_weight_gradient():
    """GraNd of a bias-free classifier: the per-sample CE gradient w.r.t. the weight alone, ``||p - y|| ||h||`` (no
    +1 of a bias). The scores are computed in float32: a few ulps of float32 relative."""
    torch.manual_seed(0)
    fc, h = nn.Linear(7, 4, bias=False).double(), torch.randn(5, 7, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    expected = torch.stack([torch.autograd.grad(F.cross_entropy(fc(h[i : i + 1]), y[i : i + 1]), fc.weight)[0].norm()
                            for i in range(5)])
    got = grand_last_layer_scores(fc(h).detach(), y, h, bias=False)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_stratified_quotas_give_the_rest_to_the_largest_remainders():
    """Class sizes 5, 3, 2 and 5 places: exact shares 2.5, 1.5, 1.0 -> floors 2, 1, 1 and one place left, which goes
    to the largest remainder (0.5, tie between classes 0 and 1 -> the lower class 0): quotas 3, 1, 1."""
    targets = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    scores = torch.arange(10.0)
    chosen = select_coreset(scores, torch.arange(10), 5, targets, stratified=True)
    assert torch.bincount(targets[chosen], minlength=3).tolist() == [3, 1, 1]
    assert chosen.tolist() == [2, 3, 4, 7, 9]  # the top scores within each class


def _coreset_env(n: int):
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_set=list(range(n))))
    return trainer, SimpleNamespace(train_order=[32, 1])


def test_score_ema_weights_the_old_scores_by_a():
    """``s = a s_old + (1 - a) s_new`` with an asymmetric a = 0.25 (dyadic values: exact)."""
    n = 4
    trainer, module = _coreset_env(n)
    old = {32: torch.tensor([1.0, 0, 0, 0]), 1: torch.tensor([0.0, 1, 0, 0])}
    new = {32: torch.tensor([0.0, 0, 1, 0]), 1: torch.tensor([0.0, 0, 0, 1])}
    cb = BitwiseCoresetCallback(prune_rate=0.5, score_ema=0.25)
    for epoch, scores in ((1, old), (2, new)):
        cb._score_pass = lambda t, m, ds, b, s=scores: (torch.arange(n), None, dict(s))
        cb.refresh(trainer, module, epoch)
    for b in (32, 1):
        assert torch.equal(cb.scores[b], 0.25 * old[b] + 0.75 * new[b])


def test_random_scores_and_random_fractions_are_drawn_per_bit_width():
    """Each child gets its own random draw (the bit-width is part of the seed), reproducible under one seed: with
    N = 64 and subsets of 32, two independent draws coincide with probability 1 / C(64, 32) ~ 1e-18."""
    n = 64
    trainer, module = _coreset_env(n)
    cb = BitwiseCoresetCallback(prune_rate=0.5, score="random", seed=3)
    cb.refresh(trainer, module, 1)
    assert not torch.equal(cb.subsets[32], cb.subsets[1])
    again = BitwiseCoresetCallback(prune_rate=0.5, score="random", seed=3)
    again.refresh(trainer, module, 1)
    assert all(torch.equal(cb.subsets[b], again.subsets[b]) for b in (32, 1))
    mixed = BitwiseCoresetCallback(prune_rate=0.5, random_fraction=1.0, seed=3)  # equal scores, all drawn at random
    mixed._score_pass = lambda t, m, ds, b: (torch.arange(n), None, {32: torch.zeros(n), 1: torch.zeros(n)})
    mixed.refresh(trainer, module, 1)
    assert not torch.equal(mixed.subsets[32], mixed.subsets[1])


def test_a_changed_prune_rate_on_resume_keeps_the_scores_and_drops_the_subsets():
    """Loading a state written with another prune rate keeps the scores but not the subsets (their size is wrong),
    so the next epoch chooses them again; the same prune rate keeps both."""
    n = 8
    trainer, module = _coreset_env(n)
    cb = BitwiseCoresetCallback(prune_rate=0.5)
    cb._score_pass = lambda t, m, ds, b: (torch.arange(n), None, {32: torch.arange(n) * 1.0, 1: -torch.arange(n) * 1.0})
    cb.refresh(trainer, module, 1)
    state = cb.state_dict()
    other = BitwiseCoresetCallback(prune_rate=0.75)
    other.load_state_dict(state)
    assert other.subsets == {} and all(torch.equal(other.scores[b], cb.scores[b]) for b in (32, 1))
    same = BitwiseCoresetCallback(prune_rate=0.5)
    same.load_state_dict(state)
    assert all(torch.equal(same.subsets[b], cb.subsets[b]) for b in (32, 1))
