"""SAM family under DDP (2 CPU processes, gloo): identical perturbations, weights and SSAM masks on every rank."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lightning_methods.optim import SAMON, SSAM, fisher_scores, global_topk_mask, sam_closure
from lightning_methods.parameters import frozen_bn_stats, param_groups_by_role

from helpers import TinyNet, run_ddp

SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9)


def local_batch(rank, n=6):
    g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def sam_step_with_eps(opt, ddp, model, x, y):
    """One SAM step through first_step / second_step, returning eps (after the ascent) for inspection."""
    closure = sam_closure(model, lambda: F.cross_entropy(ddp(x), y))
    closure()
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    eps = [p.detach() - b for p, b in zip(model.parameters(), before)]
    closure()
    opt.second_step()
    return eps


def _worker(rank, world_size):
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = TinyNet(num_classes=5, width=4)
    ddp = DistributedDataParallel(model)
    x, y = local_batch(rank)
    out = {}
    samon = SAMON(param_groups_by_role(model), SGD, rho=0.5)
    out["eps_samon"] = sam_step_with_eps(samon, ddp, model, x, y)
    ssam = SSAM(param_groups_by_role(model), SGD, rho=0.3, sparsity=0.5, mask_init="random")
    ssam.schedule_dynamic_update(0.5, "gradient", "random", seed=11)
    out["eps_ssam"] = sam_step_with_eps(ssam, ddp, model, x, y)
    out["mask_dynamic"] = [m.clone() for m in ssam.masks()]
    out["state_before_fisher"] = {k: v.clone() for k, v in model.state_dict().items()}
    ssam.update_fisher_mask(model, [(x[i : i + 1], y[i : i + 1]) for i in range(3)])  # this rank's 3 samples
    out["mask_fisher"] = [m.clone() for m in ssam.masks()]
    ssam.step(sam_closure(model, lambda: F.cross_entropy(ddp(x), y)))
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out  # run_ddp leaves the group (after the DDP wrapper is freed)


def test_ddp_perturbations_weights_and_masks_identical():
    r0, r1 = run_ddp(_worker, world_size=2)
    for key in ("eps_samon", "eps_ssam", "mask_dynamic", "mask_fisher", "params"):
        assert all(torch.equal(a, b) for a, b in zip(r0[key], r1[key])), key
    assert any(e.abs().sum() > 0 for e in r0["eps_samon"])
    # the Fisher mask is the top-k of the scores summed over BOTH ranks' samples
    model = TinyNet(num_classes=5, width=4)
    model.load_state_dict(r0["state_before_fisher"])
    samples = [(x[i : i + 1], y[i : i + 1]) for x, y in (local_batch(0), local_batch(1)) for i in range(3)]
    params = [p for g in param_groups_by_role(model) for p in g["params"]]
    with frozen_bn_stats(model):
        scores = fisher_scores(model, params, samples)
    d = sum(p.numel() for p in params)
    expected = global_topk_mask(scores, int(d * 0.5))
    assert all(torch.equal(a, b) for a, b in zip(expected, r0["mask_fisher"]))
