"""Sparse SAM (SSAM-F / SSAM-D): masks, Fisher scores, drop/grow, death-rate schedule, state."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from torch import nn

from lightning_methods.optim import SAM, SSAM, death_rate, drop_and_grow, fisher_scores, global_topk_mask, sam_closure
from lightning_methods.parameters import param_groups_by_role

from helpers import TinyNet

SGD = partial(torch.optim.SGD, lr=0.1)


def tiny_problem(seed=0, n=8):  # not `setup`: pytest 8.0 calls a module-level setup() itself
    torch.manual_seed(seed)
    model = TinyNet(num_classes=5, width=4)
    return model, torch.randn(n, 3, 6, 6), torch.randint(0, 5, (n,))


def loss_of(model, x, y):
    return lambda: nn.functional.cross_entropy(model(x), y)


def numel(model):
    return sum(p.numel() for p in model.parameters())


def test_initial_masks_and_density():
    model, _, _ = tiny_problem()
    d = numel(model)
    zeros = SSAM(param_groups_by_role(model), SGD, sparsity=0.3)
    assert zeros.mask_density() == 0.0 and all(m.dtype == torch.bool for m in zeros.masks())
    rnd = SSAM(param_groups_by_role(model), SGD, sparsity=0.3, mask_init="random", mask_seed=1)
    assert sum(int(m.sum()) for m in rnd.masks()) == d - math.ceil(d * 0.3)
    rnd2 = SSAM(param_groups_by_role(model), SGD, sparsity=0.3, mask_init="random", mask_seed=1)
    assert all(torch.equal(a, b) for a, b in zip(rnd.masks(), rnd2.masks()))
    scores = [torch.randn_like(p) for p in zeros.mask_parameters()]
    zeros.set_masks_from_scores(scores)
    k = int(d * 0.7)
    assert sum(int(m.sum()) for m in zeros.masks()) == k  # exactly k / d
    flat = torch.cat([s.flatten() for s in scores])
    chosen = torch.cat([m.flatten() for m in zeros.masks()])
    assert flat[chosen].min() >= flat[~chosen].max()  # global top-k, no per-layer quota
    with pytest.raises(ValueError, match="sparsity"):
        SSAM(param_groups_by_role(model), SGD, sparsity=1.5)


@pytest.mark.parametrize("mask_norm", ["full", "masked"])
def test_masked_perturbation(mask_norm):
    model, x, y = tiny_problem(1)
    rho = 0.3
    opt = SSAM(param_groups_by_role(model), SGD, rho=rho, sparsity=0.5, mask_init="random", mask_norm=mask_norm)
    params = opt.mask_parameters()  # masks are listed in this order
    assert set(params) == set(model.parameters())
    before = [p.detach().clone() for p in params]
    sam_closure(model, loss_of(model, x, y))()
    g = [p.grad.clone() for p in params]
    opt.first_step()
    eps = [p.detach() - b for p, b in zip(params, before)]
    masks = opt.masks()
    for e, m in zip(eps, masks):
        assert torch.equal(e[~m], torch.zeros_like(e[~m]))
    full = torch.linalg.vector_norm(torch.cat([t.flatten() for t in g]))
    masked = torch.linalg.vector_norm(torch.cat([(t * m).flatten() for t, m in zip(g, masks)]))
    got = torch.linalg.vector_norm(torch.cat([e.flatten() for e in eps]))
    expected = rho * masked / full if mask_norm == "full" else torch.tensor(rho)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_all_ones_is_sam_all_zeros_is_base():
    model, x, y = tiny_problem(2)
    ms = [copy.deepcopy(model) for _ in range(4)]
    make = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    opts = [SSAM(param_groups_by_role(ms[0]), make, rho=0.4, mask_init="ones"),
            SAM(param_groups_by_role(ms[1]), make, rho=0.4),
            SSAM(param_groups_by_role(ms[2]), make, rho=0.4, mask_init="zeros"),
            make(ms[3].parameters())]
    for _ in range(2):
        for m, o in zip(ms, opts):
            o.step(sam_closure(m, loss_of(m, x, y)))
    for a, b, c, d in zip(*(m.parameters() for m in ms)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        torch.testing.assert_close(c, d, atol=1e-6, rtol=0)
        assert not torch.allclose(a, c)


def test_fisher_matches_explicit_per_sample_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    x, y = torch.randn(4, 3), torch.tensor([0, 3, 1, 3])
    scores = fisher_scores(lin, [lin.weight, lin.bias], [(x[i : i + 1], y[i : i + 1]) for i in range(4)])
    with torch.no_grad():  # softmax regression: d CE / d z = softmax(z) - onehot(y)
        r = torch.softmax(lin(x), dim=1) - nn.functional.one_hot(y, 4).float()
        f_w = sum(torch.outer(r[i], x[i]) ** 2 for i in range(4))
        f_b = (r**2).sum(0)
    torch.testing.assert_close(scores[0], f_w)
    torch.testing.assert_close(scores[1], f_b)
    assert lin.weight.grad is None  # scored with autograd.grad, .grad untouched
    opt = SSAM([lin.weight, lin.bias], SGD, sparsity=0.75)
    opt.update_fisher_mask(lin, [(x[i : i + 1], y[i : i + 1]) for i in range(4)])
    k = int(16 * 0.25)  # d = 12 + 4 entries
    top = torch.topk(torch.cat([f_w.flatten(), f_b]), k).indices
    chosen = torch.cat([m.flatten() for m in opt.masks()]).nonzero().flatten()
    assert set(chosen.tolist()) == set(top.tolist())


def test_fisher_leaves_bn_statistics_untouched():
    model, x, y = tiny_problem(3)
    state = copy.deepcopy(model.bn.state_dict())
    fisher_scores(model, list(model.parameters()), [(x[i : i + 1], y[i : i + 1]) for i in range(3)])
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_death_rate_schedule_endpoints():
    assert death_rate(0, 0.5, 200) == pytest.approx(0.5)
    assert death_rate(100, 0.5, 200) == pytest.approx(0.25)
    assert death_rate(200, 0.5, 200) == pytest.approx(0.0, abs=1e-12)
    assert death_rate(15, 0.4, 20, t_start=10) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        death_rate(0, 0.5, 0)


@pytest.mark.parametrize("rate", [0.5, 0.37, 0.0])
def test_drop_and_grow(rate):
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (10,), (3, 2, 2)]
    d = sum(math.prod(s) for s in shapes)  # 52
    s = 0.5
    masks = global_topk_mask([torch.rand(sh, generator=g) for sh in shapes], d // 2)
    new = drop_and_grow(masks, [torch.rand(sh, generator=g) for sh in shapes],
                        [torch.rand(sh, generator=g) for sh in shapes], s, rate)
    live = sum(int(m.sum()) for m in new)
    assert abs(live - (1 - s) * d) <= 1
    survivors = [n & m for n, m in zip(new, masks)]
    grown = [n & ~m for n, m in zip(new, masks)]
    assert sum(int(v.sum()) for v in survivors) == int((1 - s) * d * (1 - rate))
    assert sum(int(v.sum()) for v in grown) == int(min((1 - s) * d * rate, s * d))


def test_dynamic_update_uses_pass1_gradients_and_applies_next_step():
    model, x, y = tiny_problem(4)
    opt = SSAM(param_groups_by_role(model), SGD, rho=0.2, sparsity=0.5, mask_init="random")
    old = [m.clone() for m in opt.masks()]
    grads, weights = [], []
    inner = sam_closure(model, loss_of(model, x, y))
    params = opt.mask_parameters()

    def closure():
        weights.append([p.detach().clone() for p in params])
        out = inner()
        grads.append([p.grad.clone() for p in params])
        return out

    opt.schedule_dynamic_update(0.5, "gradient", "random", seed=3)
    opt.step(closure)
    new = opt.masks()
    assert not all(torch.equal(a, b) for a, b in zip(old, new))
    # survivors are the live entries of the OLD mask with the largest |g| at w (pass 1)
    d = numel(model)
    live = [(g.abs() + 1e-7) * m for g, m in zip(grads[0], old)]
    expect = global_topk_mask(live, int(0.5 * d * 0.5))
    for n, m, e in zip(new, old, expect):
        assert torch.equal(n & m, e)
    # this step's ascent still used the OLD mask (the new one acts from the next step)
    eps = [b - a for a, b in zip(*weights)]
    assert all(torch.equal(e[~m], torch.zeros_like(e[~m])) for e, m in zip(eps, old))
    assert any(bool((e[m & ~n] != 0).any()) for e, m, n in zip(eps, old, new))


def test_dynamic_weight_scores_read_the_ascended_weights():
    # docs/methods/sam.md: inside a SAM step the "weight" drop scores are |w + eps| (after the ascent, as in the
    # official SSAM-D code), not |w|
    model, x, y = tiny_problem(6)
    opt = SSAM(param_groups_by_role(model), SGD, rho=5.0, sparsity=0.5, mask_init="random", mask_seed=2)
    old = [m.clone() for m in opt.masks()]
    params = opt.mask_parameters()
    weights = []
    inner = sam_closure(model, loss_of(model, x, y))

    def closure():
        weights.append([p.detach().clone() for p in params])  # call 0: w, call 1: w + eps
        return inner()

    opt.schedule_dynamic_update(0.5, "weight", "random", seed=1)
    opt.step(closure)
    keep = int(0.5 * numel(model) * 0.5)
    expect = {}
    for name, ws in (("w", weights[0]), ("w + eps", weights[1])):
        live = [(w.abs() + 1e-7) * m for w, m in zip(ws, old)]
        expect[name] = global_topk_mask(live, keep)
    assert not all(torch.equal(a, b) for a, b in zip(expect["w"], expect["w + eps"]))  # the two readings differ
    survivors = [n & m for n, m in zip(opt.masks(), old)]
    assert all(torch.equal(s, e) for s, e in zip(survivors, expect["w + eps"]))


def test_masks_survive_state_dict_as_bool():
    model, x, y = tiny_problem(5)
    make = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    opt = SSAM(param_groups_by_role(model), make, rho=0.2, mask_init="random", mask_seed=3)
    opt.step(sam_closure(model, loss_of(model, x, y)))
    state = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    opt2 = SSAM(param_groups_by_role(clone), make, rho=0.2, mask_init="zeros")
    opt2.load_state_dict(state)
    assert all(m.dtype == torch.bool for m in opt2.masks())
    assert all(torch.equal(a, b) for a, b in zip(opt.masks(), opt2.masks()))
    opt.step(sam_closure(model, loss_of(model, x, y)))
    opt2.step(sam_closure(clone, loss_of(clone, x, y)))
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
