"""KOALA-V, KOALA-M and KOALA++ equations: independent float64 re-derivations of the recursions, the Kalman
measurement property, Polyak limit, covariance fixed point, convergence on a quadratic, skipping, the S clamp."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_methods.optim import KOALAM, KOALAV, KOALAPlusPlus

A = torch.linspace(1, 10, 20, dtype=torch.float64)


def quadratic(seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def f(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (A * x * x).sum()


def quad_closure(opt, x):
    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss.detach()

    return closure


def injected(opt, params, grads, losses):
    """A closure that sets the given gradients and returns the given per-sample losses (no model needed)."""

    def closure():
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        return losses.clone()

    return closure


# ---------------------------------------------------------------------------------------------- reference recursions
def ref_koalapp_tensor(h, st, sigma, q, r, symmetric):
    """One KOALA++ tensor update written from the paper's equations (float64); returns (u, S, new state)."""
    if st is None:
        st = dict(v=sigma * h, H=h, S=h @ (sigma * h) + q * (h @ h) + r)
    v_prev, h_prev, s_prev = st["v"], st["H"], st["S"]
    x, y = h_prev @ h_prev, h_prev @ v_prev
    lam = (h @ v_prev + q * (h @ h_prev)) / s_prev
    alpha = (h @ h_prev) / x
    w = (h @ v_prev) / x - (h @ h_prev) * y / x**2 if symmetric else 0.0
    v = (alpha - lam) * v_prev + q * (h - lam * h_prev) + w * h_prev
    s = h @ v + q * (h @ h) + r
    return v + q * h, s, dict(v=v, H=h, S=s)


def run_reference(kind, xs, grad_seq, loss_seq, wd, sigma=0.1, q=0.1, r=None, symmetric=True, kappa=0.9, qx=0.01,
                  qv=0.01, lr=0.7, qx_estimate="paper", trace=None):
    """Reference trajectories of all three optimizers (float64, lists of tensors, adaptive R when r is None).
    KOALA-M's q_x EMA is fed ``||x - x_avg||^2 / n`` (``"paper"``, supp. eq. 51) or ``||x - x_avg||_2 / n``
    (``"official"``: the norm of the per-tensor norms over the total parameter count); ``trace`` collects q_x."""
    xs = [x.clone() for x in xs]
    R, traj = 1.0, []
    st = [None] * len(xs)
    P = sigma
    PM = torch.tensor([[0.1, 0.0], [0.0, 0.1]], dtype=torch.float64)
    vel = [torch.zeros_like(x) for x in xs]
    avg = [torch.zeros_like(x) for x in xs]
    for grads, losses in zip(grad_seq, loss_seq):
        if kind == "V":
            P = P + q
        if kind == "M":
            sq = sum(((a - x) ** 2).sum() for a, x in zip(avg, xs))
            d = (sq if qx_estimate == "paper" else sq.sqrt()) / sum(x.numel() for x in xs)
            qx = 0.9 * qx + 0.1 * d
            if trace is not None:
                trace.append(float(qx))
            xs = [x + v for x, v in zip(xs, vel)]
            vel = [kappa * v for v in vel]
            F = torch.tensor([[1.0, 1.0], [0.0, kappa]], dtype=torch.float64)
            PM = F @ PM @ F.T + torch.diag(torch.tensor([float(qx), qv], dtype=torch.float64))
        L, L2 = losses.mean(), (losses**2).mean()
        R = 0.9 * R + 0.1 * L2 if r is None else r
        ratios = []
        for i, g in enumerate(grads):
            h = g + wd * xs[i]
            Lp = L + 0.5 * wd * (xs[i] @ xs[i])
            if kind == "PP":
                u, s, st[i] = ref_koalapp_tensor(h, st[i], sigma, q, R, symmetric)
                xs[i] = xs[i] - lr * Lp * u / s
            elif kind == "V":
                s = P * (h @ h) + R
                xs[i] = xs[i] - lr * Lp * P / s * g
                ratios.append((h @ h) / s)
            else:
                s = PM[0, 0] * (h @ h) + R
                xs[i] = xs[i] - lr * Lp * PM[0, 0] / s * h
                vel[i] = vel[i] - lr * Lp * PM[1, 0] / s * h
                avg[i] = 0.9 * avg[i] + 0.1 * xs[i]
                ratios.append((h @ h) / s)
        if kind == "V":
            P = P - P**2 * max(ratios)
        if kind == "M":
            PM = PM - max(ratios) * torch.outer(PM[:, 0], PM[:, 0])
        traj.append([x.clone() for x in xs])
    return traj, st


def make(kind, params, **kw):
    common = dict(lr=0.7, r=kw.pop("r", None), weight_decay=kw.pop("wd", 0.0))
    if kind == "PP":
        return KOALAPlusPlus(params, sigma=0.1, q=0.1, **common, **kw)
    if kind == "V":
        return KOALAV(params, sigma=0.1, q=0.1, **common, **kw)
    return KOALAM(params, kappa=0.9, q_x=0.01, q_v=0.01, **common, **kw)


def random_problem(seed: int, steps: int) -> tuple[list, list, list]:
    """Float64 start points of two tensors (5 and 2 x 3), per-step flat gradients and per-sample losses."""
    gen = torch.Generator().manual_seed(seed)
    x0 = [torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(2, 3, generator=gen, dtype=torch.float64)]
    grads = [[torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)]
             for _ in range(steps)]
    losses = [torch.rand(4, generator=gen, dtype=torch.float64) * 3 for _ in range(steps)]
    return x0, grads, losses


@pytest.mark.parametrize("kind,symmetric", [("PP", True), ("PP", False), ("V", None), ("M", None)])
def test_trajectory_matches_reference(kind, symmetric):
    """Random gradients and per-sample losses, two tensors, weight decay, adaptive R: 6 steps against the reference."""
    x0, grads, losses = random_problem(seed=3, steps=6)
    params = [torch.nn.Parameter(x.clone()) for x in x0]
    kw = {} if symmetric is None else {"symmetric": symmetric}
    opt = make(kind, params, wd=0.05, **kw)
    ref, ref_state = run_reference(kind, [x.reshape(-1) for x in x0], grads, losses, wd=0.05,
                                   symmetric=symmetric is not False)
    for k in range(6):
        opt.step(injected(opt, params, [g.view_as(p) for g, p in zip(grads[k], params)], losses[k]))
        for p, want in zip(params, ref[k]):
            torch.testing.assert_close(p.detach().reshape(-1), want, rtol=1e-9, atol=1e-12)
    if kind == "PP":
        for p, want in zip(params, ref_state):
            torch.testing.assert_close(opt.state[p]["v"], want["v"], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["S"], want["S"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("estimate", ["paper", "official"])
def test_koalam_q_x_estimate_matches_reference(estimate):
    """Both q_x estimates of KOALA-M (spec: official code ||x - x_avg||_2 / n_params, supp. eq. 51 squared norm / n)
    against the float64 reference: the trajectory and the q_x state after each step."""
    x0, grads, losses = random_problem(seed=11, steps=5)
    params = [torch.nn.Parameter(x.clone()) for x in x0]
    opt = make("M", params, wd=0.05, q_x_estimate=estimate)
    trace: list[float] = []
    ref, _ = run_reference("M", [x.reshape(-1) for x in x0], grads, losses, wd=0.05, qx_estimate=estimate, trace=trace)
    for k in range(5):
        opt.step(injected(opt, params, [g.view_as(p) for g, p in zip(grads[k], params)], losses[k]))
        assert opt.state["koala"]["q_x"].item() == pytest.approx(trace[k], rel=1e-12)
        for p, want in zip(params, ref[k]):
            torch.testing.assert_close(p.detach().reshape(-1), want, rtol=1e-9, atol=1e-12)


def test_koalam_forward_and_backward_run_at_the_look_ahead_point():
    """Spec: predict() runs before the forward pass (x += v, v *= kappa), so the closure sees x + v."""
    x = quadratic(4)
    opt = KOALAM([x], lr=0.5, weight_decay=0.0)
    opt.step(quad_closure(opt, x))  # the first step gives a non-zero velocity
    v, before = opt.state[x]["velocity"].clone(), x.detach().clone()
    assert v.abs().max().item() > 0
    seen = []
    inner = quad_closure(opt, x)

    def closure():
        seen.append(x.detach().clone())
        return inner()

    opt.step(closure)
    assert torch.equal(seen[0], before + v)  # the same float64 addition: bitwise


@pytest.mark.parametrize("symmetric", [True, False])
def test_first_step_is_parallel_to_the_negative_gradient(symmetric):
    x = quadratic()
    opt = KOALAPlusPlus([x], lr=1.0, sigma=0.1, q=0.1, weight_decay=0.0, symmetric=symmetric)
    closure = quad_closure(opt, x)
    x0 = x.detach().clone()
    closure()
    g = x.grad.clone()
    opt.step(closure)
    cos = torch.nn.functional.cosine_similarity(x.detach() - x0, -g, dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
def test_kalman_measurement_property(symmetric):
    """R = 0: -H.dtheta = lr * L at every step; R > 0: -H.dtheta = lr L (H.u) / (H.u + R) < lr L."""
    for r in (0.0, 2.0):
        x = quadratic(1)
        opt = KOALAPlusPlus([x], lr=0.8, sigma=0.1, q=0.1, r=r, weight_decay=0.0, symmetric=symmetric)
        closure = quad_closure(opt, x)
        for _ in range(15):
            before = x.detach().clone()
            loss = opt.step(closure)
            h = x.grad.detach()
            decrease = -(h @ (x.detach() - before))
            if r == 0.0:
                assert decrease.item() == pytest.approx(0.8 * loss.item(), rel=1e-10)
            else:
                hu = opt.state[x]["S"] - r  # S = H.u + R
                assert decrease.item() == pytest.approx(0.8 * loss.item() * hu.item() / (hu.item() + r), rel=1e-10)
                assert decrease.item() < 0.8 * loss.item()


@pytest.mark.parametrize("symmetric", [True, False])
def test_quadratic_convergence(symmetric):
    x = quadratic()
    opt = KOALAPlusPlus([x], lr=1.0, sigma=0.1, q=0.1, r=0.0, weight_decay=0.0, symmetric=symmetric)
    for _ in range(50):
        opt.step(quad_closure(opt, x))
    assert f(x).item() < 1e-8
    x = quadratic()
    f0 = f(x).item()
    opt = KOALAPlusPlus([x], lr=1.0, sigma=0.1, q=0.1, weight_decay=0.0, symmetric=symmetric)  # adaptive R, R0 = 1
    for _ in range(200):
        opt.step(quad_closure(opt, x))
    assert f(x).item() / f0 <= 1e-6


@pytest.mark.parametrize("cls", [KOALAV, KOALAM])
def test_quadratic_convergence_koala_v_and_m(cls):
    x = quadratic()
    f0 = f(x).item()
    opt = cls([x], lr=1.0, weight_decay=0.0)  # defaults, adaptive R
    for _ in range(200):
        opt.step(quad_closure(opt, x))
    assert f(x).item() / f0 <= 1e-6


def test_koalav_polyak_step_and_covariance_fixed_point():
    x = quadratic(2)
    opt = KOALAV([x], lr=0.6, sigma=0.1, q=0.01, r=0.0, weight_decay=0.0)
    closure = quad_closure(opt, x)
    for _ in range(5):
        before = x.detach().clone()
        loss = opt.step(closure)
        g = x.grad.detach()
        torch.testing.assert_close(x.detach() - before, -0.6 * loss * g / (g @ g), rtol=1e-12, atol=0)
    # constant gradient norm ||g||^2 = G, fixed R: P_hat -> (q + sqrt(q^2 + 4 q R / G)) / 2
    q, R = 0.01, 3.0
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    c = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64)
    opt = KOALAV([w], lr=0.1, sigma=5.0, q=q, r=R, weight_decay=0.0)
    for _ in range(300):
        opt.step(injected(opt, [w], [c], torch.tensor([1.0], dtype=torch.float64)))
    G = (c @ c).item()
    p_hat = (q + math.sqrt(q * q + 4 * q * R / G)) / 2
    assert opt.state["koala"]["P"].item() == pytest.approx(p_hat - q, rel=1e-5)


def test_asymmetric_has_no_w_and_repeated_gradient_gives_alpha_one():
    gen = torch.Generator().manual_seed(5)
    h1, h2 = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    one = torch.tensor([1.3], dtype=torch.float64)
    p_sym = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    sym = KOALAPlusPlus([p_sym], weight_decay=0.0, r=0.5)
    for h in (h1, h2):
        sym.step(injected(sym, [p_sym], [h], one))
    v2, s2 = sym.state[p_sym]["v"].clone(), sym.state[p_sym]["S"].clone()
    # symmetric=False: v = (alpha - lam) v_prev + Q (H - lam H_prev), no w term
    p_asym = torch.nn.Parameter(p_sym.detach().clone())
    asym = KOALAPlusPlus([p_asym], weight_decay=0.0, r=0.5, symmetric=False)
    asym.load_state_dict(sym.state_dict())
    asym.param_groups[0]["symmetric"] = False
    h3 = torch.randn(6, generator=gen, dtype=torch.float64)
    asym.step(injected(asym, [p_asym], [h3], one))
    lam = (h3 @ v2 + 0.1 * (h3 @ h2)) / s2
    alpha = (h3 @ h2) / (h2 @ h2)
    torch.testing.assert_close(asym.state[p_asym]["v"], (alpha - lam) * v2 + 0.1 * (h3 - lam * h2), rtol=1e-12, atol=0)
    # H_k = H_{k-1}: alpha = 1 and w = 0, so both variants take the same step
    asym.load_state_dict(sym.state_dict())
    asym.param_groups[0]["symmetric"] = False
    p_asym.data.copy_(p_sym.detach())
    for opt, p in ((sym, p_sym), (asym, p_asym)):
        opt.step(injected(opt, [p], [h2], one))
    torch.testing.assert_close(p_sym, p_asym, rtol=1e-13, atol=0)
    lam = (h2 @ v2 + 0.1 * (h2 @ h2)) / s2
    torch.testing.assert_close(sym.state[p_sym]["v"], (1 - lam) * v2 + 0.1 * (1 - lam) * h2, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["PP", "V", "M"])
def test_zero_gradient_tensor_is_skipped_and_keeps_its_state(kind):
    gen = torch.Generator().manual_seed(7)
    a, b = (torch.nn.Parameter(torch.randn(4, generator=gen)) for _ in range(2))
    opt = make(kind, [a, b], wd=0.01)
    loss = torch.tensor([1.0, 2.0])
    opt.step(injected(opt, [a, b], [torch.randn(4, generator=gen), torch.randn(4, generator=gen)], loss))
    opt.predict()  # KOALA-M's prediction moves every tensor by its velocity: compare around the update only
    b_before = b.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[b].items()}
    injected(opt, [a, b], [torch.randn(4, generator=gen), torch.zeros(4)], loss)()
    opt.update(loss.mean(), loss.square().mean())
    assert torch.equal(b.detach(), b_before)
    for k, v in opt.state[b].items():
        assert torch.equal(v, state_before[k]), k
    if kind == "PP":  # a tensor whose first gradient is zero gets no state
        c = torch.nn.Parameter(torch.ones(3))
        opt.add_param_group({"params": [c]})
        opt.step(injected(opt, [a, b, c], [torch.randn(4, generator=gen), None, torch.zeros(3)], loss))
        assert len(opt.state[c]) == 0 and torch.equal(c.detach(), torch.ones(3))


def test_koalav_covariance_ignores_skipped_tensors():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    ga = torch.tensor([1.0, 2.0, 2.0])
    loss = torch.tensor([2.0])
    opt = KOALAV([a, b], sigma=0.1, q=0.05, r=1.0, weight_decay=0.0)
    opt.step(injected(opt, [a, b], [ga, torch.zeros(3)], loss))
    p_hat = 0.15
    assert opt.state["koala"]["P"].item() == pytest.approx(p_hat - p_hat**2 * 9 / (p_hat * 9 + 1.0), rel=1e-6)


def test_s_clamp_fires_and_is_counted():
    """Steps whose innovation H.u + R falls below R (H.u < 0; frequent with Q = 0) are clamped to R and counted."""
    gen = torch.Generator().manual_seed(0)
    r = 0.01
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = KOALAPlusPlus([p], weight_decay=0.0, r=r, sigma=0.1, q=0.0)
    st, expected = None, 0
    for _ in range(40):
        h = torch.randn(2, generator=gen, dtype=torch.float64) * torch.rand(1, generator=gen, dtype=torch.float64) * 3
        _, s_raw, _ = ref_koalapp_tensor(h, st, 0.1, 0.0, r, True)
        clamped = bool(s_raw < r)
        expected += clamped
        opt.step(injected(opt, [p], [h], torch.tensor([1.0], dtype=torch.float64)))
        st = {k: v.clone() for k, v in opt.state[p].items()}  # continue from the clamped state, as the optimizer does
        assert opt.state[p]["S"].item() == pytest.approx(r if clamped else s_raw.item(), rel=1e-12)
    assert 0 < expected < 40
    assert int(opt.s_clamp_count) == expected
    assert opt.statistics()["s_clamps"] is opt.s_clamp_count


def test_loss_offset_and_negative_loss_error():
    x = torch.nn.Parameter(torch.ones(2))
    opt = KOALAPlusPlus([x], weight_decay=0.0)
    with pytest.raises(ValueError, match="loss_offset"):
        opt.step(injected(opt, [x], [torch.ones(2)], torch.tensor([-1.0, -0.5])))
    x = torch.nn.Parameter(torch.ones(2))
    opt = KOALAPlusPlus([x], weight_decay=0.0, r=0.0, loss_offset=2.0)
    opt.step(injected(opt, [x], [torch.ones(2)], torch.tensor([-1.0, -0.5])))
    # with R = 0 the first step removes lr * (L + offset) along g: -g.dx = 1.25
    assert (-(torch.ones(2) @ (x.detach() - 1))).item() == pytest.approx(1.25, rel=1e-5)


def test_bad_arguments_and_closures():
    x = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="lr"):
        KOALAPlusPlus([x], lr=-1.0)
    with pytest.raises(ValueError, match="alpha_r"):
        KOALAV([x], alpha_r=1.0)
    with pytest.raises(ValueError, match="positive"):
        KOALAM([x], sigma_c=1.0)
    with pytest.raises(ValueError, match="shared by all parameter groups"):
        KOALAV([{"params": [x]}, {"params": [torch.nn.Parameter(torch.ones(1))], "q": 0.5}])
    opt = KOALAPlusPlus([x])
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(TypeError, match="must return the loss as a tensor"):
        opt.step(lambda: 1.0)
    assert KOALAPlusPlus.supports_grad_scaler is False and KOALAV.supports_grad_scaler is False


def test_bf16_parameters_keep_fp32_state_and_math():
    p = torch.nn.Parameter(torch.randn(8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    opt = KOALAPlusPlus([p])
    for _ in range(2):
        opt.step(injected(opt, [p], [torch.randn(8).to(torch.bfloat16)], torch.tensor([1.0, 2.0])))
    assert p.dtype == torch.bfloat16 and opt.state[p]["v"].dtype == torch.float32
    fresh = KOALAPlusPlus([p])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["v"].dtype == torch.float32 and torch.equal(fresh.state[p]["v"], opt.state[p]["v"])
