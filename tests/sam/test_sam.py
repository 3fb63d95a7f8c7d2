"""SAM / ASAM / SAM-ON / ASAM-ON as plain torch optimizers: reference values, invariants, state round trips."""

from __future__ import annotations

import copy
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_methods.models import available_backbones, create_backbone
from lightning_methods.optim import ASAM, ASAMON, SAM, SAMON, sam_closure
from lightning_methods.parameters import NORM_TYPES, param_groups_by_role

from helpers import TinyNet

SGD = partial(torch.optim.SGD, lr=0.1)
A = torch.tensor([1.0, 10.0])


def quad_closure(opt, params_and_mats):
    def closure():
        opt.zero_grad()
        loss = sum(0.5 * (a * w * w).sum() for w, a in params_and_mats)
        loss.backward()
        return loss.detach()

    return closure


def tiny_setup(seed=0, n=8):
    torch.manual_seed(seed)
    model = TinyNet(num_classes=5, width=4)
    x, y = torch.randn(n, 3, 6, 6), torch.randint(0, 5, (n,))
    return model, x, y


def norm_params(model):
    return {p for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}


def grads_at(model, params, x, y):
    """Gradient of the batch loss w.r.t. ``params`` ({name: tensor}) of a throw-away copy (BN in train mode)."""
    model = copy.deepcopy(model)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


# ------------------------------------------------------------------------------------------------ reference values
@pytest.mark.parametrize("dtype,atol", [
    # the spec's values are rounded to 8 decimals (<= 5e-9 off); float64 rounding adds about 1e-15
    (torch.float64, 1e-8),
    # float32: in addition about five roundings of half an ulp (6e-8) at the scale |w + eps| ~ 1.05 (the ascent add,
    # the gradient 10 (w + eps) scaled by lr 0.1, lr's representation, the SGD update): 5e-9 + 5 * 6e-8 < 4e-7
    (torch.float32, 4e-7),
])
def test_sam_quadratic_reference(dtype, atol):
    w = nn.Parameter(torch.tensor([1.0, 1.0], dtype=dtype))
    opt = SAM([w], SGD, rho=0.05)
    closure = quad_closure(opt, [(w, A.to(dtype))])
    closure()
    opt.first_step()
    eps = torch.tensor([0.00497519, 0.04975186], dtype=dtype)
    torch.testing.assert_close(w.detach() - 1.0, eps, atol=atol, rtol=0)
    opt.zero_grad()
    closure()
    opt.second_step()
    torch.testing.assert_close(w.detach(), torch.tensor([0.89950248, -0.04975186], dtype=dtype), atol=atol, rtol=0)


def test_step_evaluates_closure_twice_and_returns_pass1_loss():
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = SAM([w], SGD, rho=0.05)
    losses = []
    inner = quad_closure(opt, [(w, A)])

    def closure():
        losses.append(inner())
        return losses[-1]

    out = opt.step(closure)
    assert len(losses) == 2 and out is losses[0]
    assert out.item() == pytest.approx(5.5) and losses[1].item() > 5.5  # pass 2 runs at the (worse) perturbed point
    assert opt.last_perturbed_loss is losses[1] and opt.last_step_was_sam
    torch.testing.assert_close(w.detach(), torch.tensor([0.89950248, -0.04975186]), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


def test_asam_property_and_unit_T_for_bias_and_beta():
    # float64, so the spec's "||eps / T|| = rho to 1e-7" is far above the rounding (~1e-16) and xi's share (rho xi / n)
    f64 = dict(dtype=torch.float64)
    w = nn.Parameter(torch.tensor([[2.0, 0.5]], **f64))  # role weight
    b = nn.Parameter(torch.tensor([0.3, -0.7], **f64))  # role bias
    beta = nn.Parameter(torch.tensor([1.5], **f64))  # norm shift
    mats = [(w, torch.tensor([[1.0, 10.0]], **f64)), (b, torch.tensor([2.0, 3.0], **f64)),
            (beta, torch.tensor([4.0], **f64))]
    groups = [{"params": [w], "role": "weight"}, {"params": [b], "role": "bias"},
              {"params": [beta], "role": "norm", "scale": False}]
    opt = ASAM(groups, SGD, rho=0.5, eta=0.01)
    olds = [p.detach().clone() for p, _ in mats]
    quad_closure(opt, mats)()
    grads = [p.grad.clone() for p, _ in mats]
    opt.first_step()
    eps = [p.detach() - o for (p, _), o in zip(mats, olds)]
    t_w = olds[0].abs() + 0.01
    ratio = torch.cat([(eps[0] / t_w).flatten(), eps[1], eps[2]])
    assert torch.linalg.vector_norm(ratio).item() == pytest.approx(0.5, abs=1e-7)
    # independent formula: eps = rho T^2 g / ||T g|| with T = 1 on the bias and on beta
    n = torch.linalg.vector_norm(torch.cat([(t_w * grads[0]).flatten(), grads[1], grads[2]]))
    torch.testing.assert_close(eps[0], 0.5 * t_w**2 * grads[0] / n)
    torch.testing.assert_close(eps[1], 0.5 * grads[1] / n)
    torch.testing.assert_close(eps[2], 0.5 * grads[2] / n)


def test_asam_normalize_bias_with_eta_zero_is_davda54_adaptive():
    """Spec: davda54's ``adaptive=True`` is eps = rho T^2 g / ||T g|| with T = |w| (eta = 0) on ALL parameters, biases
    and BN included; docs/methods/sam.md: ``ASAM(normalize_bias=True, eta=0)`` reproduces it. Float64, so the
    default float64 tolerances of assert_close (rtol 1e-7) are far above the rounding."""
    torch.manual_seed(0)
    model = TinyNet(num_classes=5, width=4).double()
    with torch.no_grad():
        model.bn.bias.uniform_(-1.0, 1.0)  # beta starts at 0, where |w| = 0 would hide whether T applies to it
        model.bn.weight.uniform_(0.5, 1.5)
    x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    opt = ASAM(param_groups_by_role(model), SGD, rho=2.0, eta=0.0, normalize_bias=True)
    before, g, delta = ascent(model, opt, x, y)
    n = torch.linalg.vector_norm(torch.cat([(before[k].abs() * g[k]).flatten() for k in before]))
    for k in before:
        torch.testing.assert_close(delta[k], 2.0 * before[k].abs() ** 2 * g[k] / n)
    assert torch.linalg.vector_norm(delta["bn.bias"]).item() > 0


def test_global_norm_spans_param_groups():
    ws = [nn.Parameter(torch.tensor([1.0, 1.0])), nn.Parameter(torch.tensor([0.5, -2.0]))]
    mats = list(zip(ws, [A, torch.tensor([3.0, 0.2])]))
    ws2 = [nn.Parameter(w.detach().clone()) for w in ws]
    mats2 = list(zip(ws2, [A, torch.tensor([3.0, 0.2])]))
    split = SAM([{"params": [ws[0]], "lr": 0.1}, {"params": [ws[1]], "lr": 0.1}], SGD, rho=0.3)
    merged = SAM(ws2, SGD, rho=0.3)
    for opt, m in ((split, mats), (merged, mats2)):
        quad_closure(opt, m)()
        opt.first_step()
    for a, b in zip(ws, ws2):
        torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)
    eps = torch.cat([ws[0].detach() - torch.tensor([1.0, 1.0]), ws[1].detach() - torch.tensor([0.5, -2.0])])
    assert torch.linalg.vector_norm(eps).item() == pytest.approx(0.3, abs=1e-6)


def test_exact_restore_and_rho_zero_equals_base_step():
    model, x, y = tiny_setup()
    opt = SAM(param_groups_by_role(model), SGD, rho=0.2)
    w0 = [p.detach().clone() for p in model.parameters()]
    closure = sam_closure(model, lambda: nn.functional.cross_entropy(model(x), y))
    closure()
    opt.first_step(zero_grad=True)
    closure()
    g2 = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    for p, w, g in zip(model.parameters(), w0, g2):
        assert torch.equal(p.detach(), w.add(g, alpha=-0.1))  # bitwise: copy-restore, then the SGD update

    model_a, x, y = tiny_setup(1)
    model_b = copy.deepcopy(model_a)
    sam = SAM(model_a.parameters(), SGD, rho=0.0)
    sgd = SGD(model_b.parameters())
    sam.step(sam_closure(model_a, lambda: nn.functional.cross_entropy(model_a(x), y)))
    sgd.step(sam_closure(model_b, lambda: nn.functional.cross_entropy(model_b(x), y)))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------------ SAM-ON family
def ascent(model, opt, x, y):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    closure = sam_closure(model, lambda: nn.functional.cross_entropy(model(x), y))
    closure()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.first_step()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return before, grads, delta


NORM_NAMES = ("bn.weight", "bn.bias")


@pytest.mark.parametrize("cls,kwargs", [(SAMON, {}), (ASAMON, {"eta": 0.01}), (ASAMON, {"normalize_bias": True}),
                                        (ASAMON, {"adaptive": "layerwise", "eta": 0.1}), (ASAMON, {"p": "inf"})])
def test_samon_variants_perturb_only_norm(cls, kwargs):
    model, x, y = tiny_setup()
    rho = 0.7
    opt = cls(param_groups_by_role(model), SGD, rho=rho, **kwargs)
    before, g, delta = ascent(model, opt, x, y)
    for n in delta:
        if n not in NORM_NAMES:
            assert torch.equal(delta[n], torch.zeros_like(delta[n])), n  # bitwise untouched
    gamma, beta = before["bn.weight"], before["bn.bias"]
    if cls is SAMON:
        assert torch.linalg.vector_norm(torch.cat([delta[n] for n in NORM_NAMES])).item() == pytest.approx(rho, 1e-6)
        return
    eta = kwargs.get("eta", 0.01)
    if kwargs.get("adaptive") == "layerwise":  # T = ||w|| (1 + eta) (official operator precedence), beta T = 1
        t_g = torch.linalg.vector_norm(gamma) * (1 + eta)
        n = torch.linalg.vector_norm(torch.cat([t_g * g["bn.weight"], g["bn.bias"]]))
        torch.testing.assert_close(delta["bn.weight"], rho * t_g**2 * g["bn.weight"] / n)
        torch.testing.assert_close(delta["bn.bias"], rho * g["bn.bias"] / n)
        return
    t_g = gamma.abs() + eta
    t_b = beta.abs() + eta if kwargs.get("normalize_bias") else torch.ones_like(beta)
    if kwargs.get("p") == "inf":
        torch.testing.assert_close(delta["bn.weight"], rho * t_g * g["bn.weight"].sign())
        torch.testing.assert_close(delta["bn.bias"], rho * g["bn.bias"].sign())
        return
    scaled = torch.cat([delta["bn.weight"] / t_g, delta["bn.bias"] / t_b])
    assert torch.linalg.vector_norm(scaled).item() == pytest.approx(rho, abs=1e-6)


def test_no_norm_leaves_norm_untouched_and_all_matches_sam():
    model, x, y = tiny_setup()
    _, g, delta = ascent(model, SAM(param_groups_by_role(model), SGD, rho=0.3, perturb="no_norm"), x, y)
    for n in NORM_NAMES:
        assert torch.equal(delta[n], torch.zeros_like(delta[n]))
    others = [n for n in delta if n not in NORM_NAMES]
    assert torch.linalg.vector_norm(torch.cat([delta[n].flatten() for n in others])).item() == pytest.approx(0.3, 1e-6)
    model, x, y = tiny_setup()
    _, g, delta = ascent(model, SAM(param_groups_by_role(model), SGD, rho=0.3, perturb="all"), x, y)
    gn = torch.linalg.vector_norm(torch.cat([v.flatten() for v in g.values()]))
    for n in delta:  # plain SAM: eps = rho g / ||g|| over every tensor
        torch.testing.assert_close(delta[n], 0.3 * g[n] / gn, atol=1e-6, rtol=0)


@pytest.mark.parametrize("perturb", ["all", "only_norm", "no_norm"])
def test_update_equals_independent_autograd(perturb):
    """w_new = w - lr * grad L(w + eps), with eps and the gradient at w + eps computed independently."""
    model, x, y = tiny_setup(3)
    rho, lr = 0.4, 0.1
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = grads_at(model, w, x, y)
    sel = [n for n in w if perturb == "all" or ((n in NORM_NAMES) == (perturb == "only_norm"))]
    norm = torch.linalg.vector_norm(torch.cat([g[n].flatten() for n in sel]))
    w_adv = {n: w[n] + rho * g[n] / norm if n in sel else w[n] for n in w}
    g_adv = grads_at(model, w_adv, x, y)
    opt = SAM(param_groups_by_role(model), partial(torch.optim.SGD, lr=lr), rho=rho, perturb=perturb)
    opt.step(sam_closure(model, lambda: nn.functional.cross_entropy(model(x), y)))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n] - lr * g_adv[n], atol=1e-6, rtol=0)


def test_roles_from_model_or_clear_error():
    model, x, y = tiny_setup()
    with pytest.raises(ValueError, match="selects parameters by role"):
        SAMON(model.parameters(), SGD)
    with pytest.raises(ValueError, match="selects parameters by role"):
        ASAM(model.parameters(), SGD)
    SAM(model.parameters(), SGD)  # plain SAM needs no roles
    ASAM(model.parameters(), SGD, normalize_bias=True)  # T on every tensor: no roles needed
    opt = SAMON(model.parameters(), SGD, model=model)
    assert set(opt.perturbed_parameters()) == norm_params(model)
    ref = copy.deepcopy(model)
    _, _, d1 = ascent(model, opt, x, y)
    _, _, d2 = ascent(ref, SAMON(param_groups_by_role(ref), SGD), x, y)
    for n in d1:
        assert torch.equal(d1[n], d2[n])


def test_invalid_arguments_are_clear():
    model, _, _ = tiny_setup()
    groups = param_groups_by_role(model)
    with pytest.raises(ValueError, match="rho"):
        SAM(groups, SGD, rho=-1)
    with pytest.raises(ValueError, match="perturb"):
        SAM(groups, SGD, perturb="norm")
    with pytest.raises(ValueError, match="p must be"):
        SAM(groups, SGD, p=1)
    with pytest.raises(ValueError, match="freeze_non_norm_pass1"):
        SAM(groups, SGD, freeze_non_norm_pass1=True)
    with pytest.raises(TypeError, match="not a torch Optimizer"):
        SAM(groups, lambda p: object())
    assert SAM.supports_grad_scaler is False


@pytest.mark.parametrize("name", available_backbones())
def test_norm_selection_covers_every_backbone(name):
    with torch.device("meta"):
        model = create_backbone(name, num_classes=10)
    expected = norm_params(model)
    if not expected:  # e.g. the plain CNNs of the federated families, MLPs without norm layers
        with pytest.raises(ValueError, match="has none"):
            SAMON(param_groups_by_role(model), SGD)
        return
    opt = SAMON(param_groups_by_role(model), SGD)
    assert set(opt.perturbed_parameters()) == expected
    assert sum(p.numel() for p in opt.perturbed_parameters()) == sum(p.numel() for p in expected)


# ------------------------------------------------------------------------------------------------ schedules, speed flag
def counting(model, x, y):
    calls = []

    def make():
        inner = sam_closure(model, lambda: nn.functional.cross_entropy(model(x), y))

        def closure():
            calls.append(1)
            return inner()

        return closure

    return calls, make


def test_sam_every_k_probability_and_epoch_window():
    model, x, y = tiny_setup()
    opt = SAM(param_groups_by_role(model), SGD, rho=0.1, sam_every_k=3)
    calls, make = counting(model, x, y)
    pattern = []
    for _ in range(7):
        n = len(calls)
        opt.step(make())
        pattern.append(len(calls) - n)
    assert pattern == [2, 1, 1, 2, 1, 1, 2]

    def draws(opt, n):
        out = []
        for _ in range(n):
            c = len(calls)
            opt.step(make())
            out.append(len(calls) - c == 2)
        return out

    p1 = SAM(param_groups_by_role(model), SGD, rho=0.1, sam_probability=0.5, sam_seed=7)
    first = draws(p1, 6)
    state = p1.state_dict()
    rest = draws(p1, 6)
    expected = [np.random.default_rng([7, s]).random() < 0.5 for s in range(12)]
    assert first + rest == expected and 0 < sum(expected) < 12
    p2 = SAM(param_groups_by_role(model), SGD, rho=0.1, sam_probability=0.5, sam_seed=7)
    p2.load_state_dict(state)
    assert draws(p2, 6) == rest  # the step counter survives the state dict

    win = SAM(param_groups_by_role(model), SGD, rho=0.1, sam_start_epoch=2, sam_end_epoch=4)
    with pytest.raises(RuntimeError, match="set_epoch"):
        win.step(make())
    got = []
    for epoch in range(5):
        win.set_epoch(epoch)
        got.append(draws(win, 1)[0])
    assert got == [False, False, True, True, False]


def test_freeze_non_norm_pass1_same_update_without_weight_grads():
    model_a, x, y = tiny_setup(5)
    model_b = copy.deepcopy(model_a)
    seen = []

    def loss_a():
        seen.append([p.requires_grad for p in model_a.parameters()])
        return nn.functional.cross_entropy(model_a(x), y)

    fast = SAMON(param_groups_by_role(model_a), partial(torch.optim.SGD, lr=0.1, momentum=0.9), rho=0.5,
                 freeze_non_norm_pass1=True)
    ref = SAMON(param_groups_by_role(model_b), partial(torch.optim.SGD, lr=0.1, momentum=0.9), rho=0.5)
    for _ in range(2):
        fast.step(sam_closure(model_a, loss_a))
        ref.step(sam_closure(model_b, lambda: nn.functional.cross_entropy(model_b(x), y)))
    names = [n for n, _ in model_a.named_parameters()]
    assert [n for n, rg in zip(names, seen[0]) if rg] == list(NORM_NAMES)  # pass 1: only norm params need grads
    assert all(seen[1])  # pass 2: everything
    assert all(p.requires_grad for p in model_a.parameters())
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ state, BN
def test_state_dict_round_trip_keeps_momentum_and_next_step():
    model, x, y = tiny_setup(2)
    make = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = ASAMON(param_groups_by_role(model), make, rho=2.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(2):
        opt.step(sam_closure(model, lambda: nn.functional.cross_entropy(model(x), y)))
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] < 0.1  # the scheduler on the wrapper drives the base
    state = copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in state["base_optimizer"]["state"].values())
    clone = copy.deepcopy(model)
    opt2 = ASAMON(param_groups_by_role(clone), make, rho=2.0)
    opt2.load_state_dict(state)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert all(a is b for a, b in zip(opt2.param_groups, opt2.base_optimizer.param_groups))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    opt.step(sam_closure(model, lambda: nn.functional.cross_entropy(model(x), y)))
    opt2.step(sam_closure(clone, lambda: nn.functional.cross_entropy(clone(x), y)))
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="base_optimizer"):
        opt2.load_state_dict(torch.optim.SGD(clone.parameters(), lr=0.1).state_dict())


def test_sam_closure_updates_bn_statistics_once():
    model, x, y = tiny_setup(4)
    ref = copy.deepcopy(model)
    opt = SAM(param_groups_by_role(model), SGD, rho=0.5)
    opt.step(sam_closure(model, lambda: nn.functional.cross_entropy(model(x), y)))
    ref(x)  # one training-mode forward at w: the only statistics update of the step
    assert torch.equal(model.bn.running_mean, ref.bn.running_mean)
    assert torch.equal(model.bn.running_var, ref.bn.running_var)
    assert int(model.bn.num_batches_tracked) == 1


def test_p_inf_plain_sam_is_sign():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = SAM([w], SGD, rho=0.05, p=math.inf)
    quad_closure(opt, [(w, torch.tensor([1.0, 2.0, -3.0]))])()
    g = w.grad.clone()
    opt.first_step()
    torch.testing.assert_close(w.detach() - torch.tensor([1.0, -2.0, 0.5]), 0.05 * g.sign())


def test_benchmark_measure_runs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "sam_on_ascent.py"
    spec = importlib.util.spec_from_file_location("sam_on_ascent", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.measure(backbone="resnet8", batch_size=2, steps=1, warmup=1, rounds=1, image_size=8, device="cpu",
                        variants=("sgd", "samon_freeze"))
    assert list(res) == ["sgd", "samon_freeze"] and res["sgd"]["ratio_vs_base"] == 1.0
    assert res["samon_freeze"]["ms_per_step"] > 0


# ------------------------------------------------------------------------------------------ BatchNorm in pass 2
def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3))


def _sam_steps(net: torch.nn.Module, closure_factory, steps: int = 3) -> list[warnings.WarningMessage]:
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(closure_factory(net, lambda: torch.nn.functional.cross_entropy(net(x), y)))
    return [w for w in caught if "second (perturbed) pass" in str(w.message)]


def test_a_plain_closure_that_updates_batchnorm_twice_warns_once():
    def naive(net, loss_fn):
        def closure():
            net.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss.detach()
        return closure

    net = _bn_net()
    warned = _sam_steps(net, naive)
    assert len(warned) == 1 and "BatchNorm2d" in str(warned[0].message)
    assert int(net[1].num_batches_tracked) == 6  # the documented behaviour: both passes of 3 steps counted


def test_sam_closure_freezes_batchnorm_in_pass_two_without_a_warning():
    net = _bn_net()
    assert _sam_steps(net, sam_closure) == []
    assert int(net[1].num_batches_tracked) == 3  # one update per step


def test_no_warning_without_batchnorm_in_training_mode():
    net = _bn_net().eval()
    assert _sam_steps(net, lambda n, f: (lambda: (n.zero_grad(), f().backward())[1])) == []
