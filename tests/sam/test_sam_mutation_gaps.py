"""SAM family behaviour that mutation testing found unguarded: the optimizer's own zero_grad between the passes,
add_param_group, the pass-1 freeze keeping user-frozen tensors frozen, the epoch window without an end, role
resolution of untagged norm groups, SSAM-D updates in plain steps and only once, and the score offset and count cap of
the drop/grow update."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from lightning_methods.optim import ASAM, SAM, SAMON, SSAM, drop_and_grow, global_topk_mask, sam_closure
from lightning_methods.optim.sam_masks import drop_grow_counts
from lightning_methods.parameters import param_groups_by_role

from helpers import TinyNet

SGD = partial(torch.optim.SGD, lr=0.1)


def tiny(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = TinyNet(num_classes=5, width=4).to(dtype)
    return model, torch.randn(8, 3, 6, 6, dtype=dtype), torch.randint(0, 5, (8,))


def loss_of(model, x, y):
    return lambda: nn.functional.cross_entropy(model(x), y)


def test_step_zeroes_the_pass1_gradients_before_pass2():
    """Spec (shared two-pass step): first_step ends with zero_grad(), so a closure that only calls backward (no
    zero_grad of its own) still descends along grad L(w + eps) alone, not along grad L(w) + grad L(w + eps). The spec's
    quadratic reference (A = diag(1, 10), w = (1, 1), rho = 0.05, SGD lr 0.1) gives w_new = (0.89950248, -0.04975186);
    float64, so the only error is the spec's 8-decimal rounding (<= 5e-9), hence atol 1e-8."""
    w = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    a = torch.tensor([1.0, 10.0], dtype=torch.float64)
    opt = SAM([w], SGD, rho=0.05)

    def closure():  # deliberately without zero_grad: gradients would accumulate over the two passes
        loss = 0.5 * (a * w * w).sum()
        loss.backward()
        return loss.detach()

    opt.step(closure)
    want = torch.tensor([0.89950248, -0.04975186], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), want, atol=1e-8, rtol=0)


def test_add_param_group_gets_the_default_rho_and_its_role():
    """A group added after construction gets the wrapper's rho and its role tag, so SAM-ON perturbs it when it holds
    normalization parameters: after the ascent the norm parameters (gamma from the constructor, beta added later)
    moved by exactly rho in total (float64 with xi = 0: the ascent, the subtraction and the norm round about 20 times
    at 1.1e-16 relative, so rel 1e-13 is ample)."""
    model, x, y = tiny(1, torch.float64)
    groups = param_groups_by_role(model)
    beta_group = groups.pop()  # the norm-shift group (scale False) comes last
    assert beta_group["role"] == "norm" and beta_group["scale"] is False
    opt = SAMON(groups, SGD, rho=0.3, xi=0.0)
    opt.add_param_group(beta_group)
    assert opt.param_groups[-1]["rho"] == 0.3 and opt.base_optimizer.param_groups is opt.param_groups
    assert set(opt.perturbed_parameters()) == {model.bn.weight, model.bn.bias}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sam_closure(model, loss_of(model, x, y))()
    opt.first_step()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert torch.count_nonzero(delta["bn.bias"]) > 0
    assert all(torch.equal(delta[n], torch.zeros_like(delta[n])) for n in delta if not n.startswith("bn."))
    moved = torch.linalg.vector_norm(torch.cat([delta["bn.weight"], delta["bn.bias"]]))
    assert moved.item() == pytest.approx(0.3, rel=1e-13)


def test_freeze_non_norm_pass1_keeps_user_frozen_tensors_frozen():
    """freeze_non_norm_pass1 turns requires_grad off for pass 1 and back on afterwards only for the tensors it froze:
    a tensor the user had frozen (e.g. a frozen stem while fine-tuning) stays frozen after the step."""
    model, x, y = tiny(2)
    opt = SAMON(param_groups_by_role(model), SGD, rho=0.5, freeze_non_norm_pass1=True)
    model.conv.weight.requires_grad_(False)
    frozen_before = model.conv.weight.detach().clone()
    opt.step(sam_closure(model, loss_of(model, x, y)))
    assert model.conv.weight.requires_grad is False
    assert torch.equal(model.conv.weight.detach(), frozen_before)
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "conv.weight")


def test_epoch_window_with_a_start_and_no_end():
    """sam_start_epoch alone (sam_end_epoch=None) gives plain steps before the start and SAM steps from it on, and
    needs set_epoch; an empty window (end == start) is refused."""
    model, _, _ = tiny()
    opt = SAM(param_groups_by_role(model), SGD, rho=0.1, sam_start_epoch=2)
    with pytest.raises(RuntimeError, match="set_epoch"):
        opt.sam_this_step()
    got = []
    for epoch in (0, 1, 2, 3, 50):
        opt.set_epoch(epoch)
        got.append(opt.sam_this_step())
    assert got == [False, False, True, True, True]
    with pytest.raises(ValueError, match="sam_end_epoch"):
        SAM(param_groups_by_role(model), SGD, sam_start_epoch=2, sam_end_epoch=2)


def test_norm_group_tagged_without_scale_takes_gamma_beta_from_the_model():
    """A "norm" group without the "scale" tag gets gamma/beta from model=..., so ASAM scales gamma by T = |w| + eta and
    keeps T = 1 on beta and on the bias: eps = rho T^2 g / ||T g|| (independent formula, float64, default
    assert_close tolerances far above the ~1e-16 rounding)."""
    model, x, y = tiny(3, torch.float64)
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-1.0, 1.0)
    groups = [{"params": [model.conv.weight, model.fc.weight], "role": "weight"},
              {"params": [model.fc.bias], "role": "bias"},
              {"params": [model.bn.weight, model.bn.bias], "role": "norm"}]  # no "scale" tag
    opt = ASAM(groups, SGD, rho=0.7, eta=0.01, model=model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sam_closure(model, loss_of(model, x, y))()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.first_step()
    t = {n: (before[n].abs() + 0.01 if n in ("conv.weight", "fc.weight", "bn.weight") else torch.ones_like(before[n]))
         for n in before}
    n_tg = torch.linalg.vector_norm(torch.cat([(t[n] * g[n]).flatten() for n in before]))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], 0.7 * t[n] ** 2 * g[n] / n_tg)


def _ssam_with_pass1_grads(**kw):
    model, x, y = tiny(4)
    opt = SSAM(param_groups_by_role(model), SGD, rho=0.2, sparsity=0.5, mask_init="random", **kw)
    params = opt.mask_parameters()
    grads = []

    def closure_factory():
        inner = sam_closure(model, loss_of(model, x, y))
        calls = [0]

        def closure():
            out = inner()
            if calls[0] == 0:
                grads.append([p.grad.clone() for p in params])  # pass-1 gradients at w
            calls[0] += 1
            return out

        return closure

    return model, opt, grads, closure_factory


def test_scheduled_dynamic_update_runs_in_a_plain_step_too():
    """With sam_every_k = 2 the second step is a plain base step; a drop/grow update scheduled for it is applied in
    that step from its gradients at w (survivors = top |g| of the old live entries), not deferred to the next SAM
    step."""
    model, opt, grads, closure = _ssam_with_pass1_grads(sam_every_k=2)
    opt.step(closure())
    assert opt.last_step_was_sam
    old = [m.clone() for m in opt.masks()]
    opt.schedule_dynamic_update(0.5, "gradient", "random", seed=3)
    opt.step(closure())
    assert not opt.last_step_was_sam
    new = opt.masks()
    d = sum(p.numel() for p in model.parameters())
    keep, _ = drop_grow_counts(d, 0.5, 0.5)
    expect = global_topk_mask([(g.abs() + 1e-7) * m for g, m in zip(grads[1], old)], keep)
    assert all(torch.equal(n & m, e) for n, m, e in zip(new, old, expect))


def test_scheduled_dynamic_update_is_applied_once():
    """schedule_dynamic_update acts on the next step only: the step after leaves the masks unchanged."""
    _, opt, _, closure = _ssam_with_pass1_grads()
    initial = [m.clone() for m in opt.masks()]
    opt.schedule_dynamic_update(0.5, "gradient", "random", seed=3)
    opt.step(closure())
    after_update = [m.clone() for m in opt.masks()]
    assert not all(torch.equal(a, b) for a, b in zip(initial, after_update))
    for _ in range(2):
        opt.step(closure())
        assert all(torch.equal(a, b) for a, b in zip(after_update, opt.masks()))


def test_drop_grow_counts_cap_growth_at_the_dead_entries():
    """Spec: grow int(min((1 - s) d dr, s d)). With s = 0.2 and dr = 0.5 the uncapped count (40) exceeds the 20 dead
    entries: 40 survivors, 20 grown, density 0.6 (official counts; exact in float64: 100 * 0.2 = 20, 80 * 0.5 = 40)."""
    assert drop_grow_counts(100, 0.2, 0.5) == (40, 20)
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(100, dtype=torch.bool)
    mask[torch.randperm(100, generator=gen)[:80]] = True
    new = drop_and_grow([mask], [torch.rand(100, generator=gen)], [torch.rand(100, generator=gen)], 0.2, 0.5)[0]
    assert int((new & mask).sum()) == 40 and int((new & ~mask).sum()) == 20


@pytest.mark.parametrize("sparsity,rate", [(0.9, 0.0), (0.1, 1.0)])
def test_drop_and_grow_with_zero_scores_keeps_exact_counts(sparsity, rate):
    """Zero scores (e.g. |grad| of dead ReLU units) still select live entries to keep and dead entries to grow: the
    official 1e-7 offset makes every live entry outrank every dead one in the drop scores, and vice versa in the grow
    scores. The live (first case) or dead (second case) entries are few and placed last, so without the offset the
    top-k over equal zeros could not return exactly them."""
    d = 100
    live = d - round(d * sparsity)
    mask = torch.zeros(d, dtype=torch.bool)
    if rate == 0.0:  # 10 live entries, the last ones: all of them survive
        mask[d - live:] = True
    else:  # 10 dead entries, the last ones: all of them grow
        mask[:live] = True
    keep, grow = drop_grow_counts(d, sparsity, rate)
    assert keep + grow > 0
    zeros = torch.zeros(d)
    new = drop_and_grow([mask], [zeros], [zeros], sparsity, rate)[0]
    assert int((new & mask).sum()) == keep
    assert int((new & ~mask).sum()) == grow
