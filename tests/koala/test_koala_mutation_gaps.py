"""KOALA family behaviour that mutation testing found unguarded: the gradient-norm threshold, state_dict loads that
copy instead of aliasing, the covariance update ignoring skipped tensors under weight decay, KOALA-M's weight average
of low-precision parameters, the logged statistics, and the eta_min end of the warm-up cosine schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lightning_methods.callbacks import KOALAMonitor
from lightning_methods.optim import KOALAM, KOALAV, KOALAPlusPlus
from lightning_methods.optim.warmup_cosine import WarmupCosineLR

F64 = torch.float64
CLASSES = {"PP": KOALAPlusPlus, "V": KOALAV, "M": KOALAM}


def injected(params, grads, losses):
    """A closure that sets the given gradients and returns the given per-sample losses (no model needed)."""

    def closure():
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        return losses.clone()

    return closure


@pytest.mark.parametrize("kind", list(CLASSES))
def test_gradient_above_grad_eps_is_not_skipped(kind):
    """grad_eps (1e-9) bounds the gradient NORM: a gradient of norm 1e-6 moves its tensor, one of norm 1e-10 does
    not. KOALA-V with fixed R = 1 checks the step exactly: dx = -lr L P_hat / (P_hat ||g||^2 + R) g with
    P_hat = sigma + q (float64; a handful of roundings, so rtol 1e-12)."""
    small = torch.tensor([1e-6, 0.0, 0.0], dtype=F64)
    tiny = torch.tensor([1e-10, 0.0, 0.0], dtype=F64)
    a = torch.nn.Parameter(torch.ones(3, dtype=F64))
    b = torch.nn.Parameter(torch.ones(3, dtype=F64))
    opt = CLASSES[kind]([a, b], r=1.0, weight_decay=0.0)
    loss = torch.tensor([2.0], dtype=F64)
    opt.step(injected([a, b], [small, tiny], loss))
    assert not torch.equal(a.detach(), torch.ones(3, dtype=F64))
    assert torch.equal(b.detach(), torch.ones(3, dtype=F64))
    if kind == "V":
        p_hat = 0.1 + 0.01
        want = 1.0 - 1.0 * 2.0 * p_hat / (p_hat * 1e-12 + 1.0) * small
        torch.testing.assert_close(a.detach(), want, rtol=1e-12, atol=0)


def _trained(kind: str):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(4, generator=gen, dtype=F64)),
              torch.nn.Parameter(torch.randn(2, 3, generator=gen, dtype=F64))]
    opt = CLASSES[kind](params, weight_decay=0.01)
    data = [([torch.randn(4, generator=gen, dtype=F64), torch.randn(2, 3, generator=gen, dtype=F64)],
             torch.rand(5, generator=gen, dtype=F64) * 2) for _ in range(4)]
    for grads, losses in data[:2]:
        opt.step(injected(params, grads, losses))
    return params, opt, data[2:]


@pytest.mark.parametrize("kind", list(CLASSES))
def test_load_state_dict_copies_the_state_instead_of_aliasing_it(kind):
    """Loading a live ``state_dict()`` (no serialization in between, as a deepcopy-free checkpoint hook would) gives
    the twin its own tensors: the twin's steps (R's in-place EMA, KOALA-M's in-place velocity and weight average)
    leave the source's state untouched, so both then follow the identical trajectory (bitwise, same float64 ops)."""
    params, opt, rest = _trained(kind)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = CLASSES[kind](twin_params, weight_decay=0.01)
    twin.load_state_dict(opt.state_dict())
    for grads, losses in rest:  # the twin runs first: with aliased state it would advance the source's state too
        twin.step(injected(twin_params, grads, losses))
    for grads, losses in rest:
        opt.step(injected(params, grads, losses))
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    assert torch.equal(opt.state["koala"]["R"], twin.state["koala"]["R"])


@pytest.mark.parametrize("kind", ["V", "M"])
def test_covariance_update_ignores_skipped_tensors_with_weight_decay(kind):
    """The covariance shrinks by the largest ||h||^2 / S over the ACTIVE tensors only. With weight decay a skipped
    tensor (zero gradient) still has h = wd * p != 0, here with the larger ratio, and must not enter the max.
    Checked around ``update`` with fixed R = 1: V: P = P_hat - P_hat^2 c; M: P = P - c P e1 e1^T P, with
    c = ||h_a||^2 / (P_xx ||h_a||^2 + R) (float64, a few roundings: rtol 1e-12)."""
    a = torch.nn.Parameter(torch.ones(3, dtype=F64))
    b = torch.nn.Parameter(torch.full((3,), 100.0, dtype=F64))
    wd, loss = 0.01, torch.tensor([1.5], dtype=F64)
    ga = torch.tensor([0.01, 0.02, 0.02], dtype=F64)
    opt = CLASSES[kind]([a, b], r=1.0, weight_decay=wd)
    opt.predict()
    p_before = opt.state["koala"]["P"].clone()
    h_a, h_b = ga + wd * a.detach(), wd * b.detach()
    injected([a, b], [ga, torch.zeros(3, dtype=F64)], loss)()
    opt.update(loss.mean(), loss.square().mean())
    p_xx = p_before if kind == "V" else p_before[0, 0]
    ratio_a = (h_a @ h_a) / (p_xx * (h_a @ h_a) + 1.0)
    assert (h_b @ h_b) / (p_xx * (h_b @ h_b) + 1.0) > ratio_a  # the skipped tensor would dominate the max
    if kind == "V":
        want = p_before - p_before**2 * ratio_a
    else:
        want = p_before - ratio_a * torch.outer(p_before[:, 0], p_before[:, 0])
    torch.testing.assert_close(opt.state["koala"]["P"], want, rtol=1e-12, atol=0)


def test_koalam_weight_average_follows_the_updated_bf16_weights():
    """KOALA-M's weight average moves towards the weights AFTER the update (x_avg = 0.9 x_avg + 0.1 x_new, zero
    start), also for bf16 parameters whose fp32 math copy is not the parameter itself. After the first step x_avg is
    0.1 * x_new in fp32; the lerp and the reference product each round once (half an fp32 ulp), so rtol 2.4e-7. The
    pre-update weights differ from x_new by far more (the step is ~10% of |x|)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, generator=gen).to(torch.bfloat16))
    x_old = p.detach().float().clone()
    opt = KOALAM([p], weight_decay=0.0)
    opt.step(injected([p], [torch.randn(8, generator=gen).to(torch.bfloat16)], torch.tensor([1.0, 2.0])))
    avg = opt.state[p]["x_avg"]
    assert avg.dtype == torch.float32
    torch.testing.assert_close(avg, 0.1 * p.detach().float(), rtol=2.4e-7, atol=0)
    assert not torch.allclose(avg, 0.1 * x_old, rtol=1e-3, atol=0)


def test_statistics_and_monitor_log_the_right_entries():
    """statistics() exposes R, the clamp count and each covariance entry of the state (the same tensors, no copies);
    KOALAMonitor logs them under koala/ for the first KOALA optimizer and koala/1/ for the second."""
    a, b = torch.nn.Parameter(torch.ones(3, dtype=F64)), torch.nn.Parameter(torch.ones(2, dtype=F64))
    v, m = KOALAV([a], weight_decay=0.0), KOALAM([b], weight_decay=0.0, sigma_c=0.02)
    for _ in range(2):
        v.step(injected([a], [torch.tensor([0.3, -0.2, 0.1], dtype=F64)], torch.tensor([1.0], dtype=F64)))
        m.step(injected([b], [torch.tensor([0.5, 0.4], dtype=F64)], torch.tensor([0.7], dtype=F64)))
    g, P = m.state["koala"], m.state["koala"]["P"]
    assert P[0, 0] != P[1, 1] and P[0, 1] != 0  # the entries are distinguishable
    stats = m.statistics()
    for key, want in (("P_xx", P[0, 0]), ("P_xv", P[0, 1]), ("P_vv", P[1, 1]), ("q_x", g["q_x"]), ("R", g["R"]),
                      ("s_clamps", g["s_clamps"])):
        assert torch.equal(stats[key], want), key
    assert v.statistics()["P"] is v.state["koala"]["P"]
    logged = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.__setitem__(name, value))
    trainer = SimpleNamespace(optimizers=[torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), v, m])
    KOALAMonitor().on_train_batch_end(trainer, module, None, None, 0)
    assert set(logged) == {"koala/R", "koala/s_clamps", "koala/P", "koala/1/R", "koala/1/s_clamps", "koala/1/P_xx",
                           "koala/1/P_xv", "koala/1/P_vv", "koala/1/q_x"}
    assert logged["koala/P"].item() == pytest.approx(v.state["koala"]["P"].item(), rel=1e-7)  # logged as fp32
    assert logged["koala/1/P_vv"].item() == pytest.approx(P[1, 1].item(), rel=1e-7)


def test_warmup_cosine_decays_to_eta_min():
    """WarmupCosineLR with eta_min > 0: linear warm-up to the base rate, cosine from base to eta_min, constant eta_min
    after max_iters; lr(t) = eta_min + (base - eta_min) (1 + cos(pi (t - w) / (T - w))) / 2 written out by hand
    (a few float64 roundings and one libm cosine: rel 1e-14)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = WarmupCosineLR(opt, warmup_iters=2, max_iters=10, eta_min=0.01)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(12):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    want = [0.05, 0.1] + [0.01 + 0.09 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(9)] + [0.01, 0.01]
    assert lrs == pytest.approx(want, rel=1e-14)
    assert lrs[6] == pytest.approx(0.055, rel=1e-14) and lrs[10] == pytest.approx(0.01, rel=1e-14)
