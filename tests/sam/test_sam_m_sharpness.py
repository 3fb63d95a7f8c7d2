"""SAM's m-sharpness under DDP (``m_sharpness=True``; 2 CPU processes, gloo, float64): each rank's ascent uses its own
batch's gradient and norm, the descent gradient is the mean over the ranks of each rank's gradient at its own
``w + eps``, the weights stay identical on every rank, SSAM-D masks stay identical, and ImageClassifier's closure under
``Trainer(strategy="ddp")`` honours the flag. References: the same steps in one process, rank by rank."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lightning_methods import ImageClassifier
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.optim import SAM, SSAM, global_topk_mask, sam_closure
from lightning_methods.optim.sam_masks import drop_grow_counts
from lightning_methods.parameters import param_groups_by_role
from lightning_methods.utils import leave_process_group

from helpers import TinyNet, next_group_port, run_ddp

SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
#: the same float64 operations in the worker and in the reference; slack for a different summation order only
RTOL = 1e-10


def local_batch(rank: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    return torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(num_classes=5, width=4).double()


def step_recording_eps(opt: SAM, model: torch.nn.Module, closure) -> list[torch.Tensor]:
    """``opt.step(closure)``, returning the ascent ``eps`` of every parameter."""
    eps: list[torch.Tensor] = []
    first = opt.first_step

    def recording(zero_grad: bool = False) -> None:
        before = [p.detach().clone() for p in model.parameters()]
        first(zero_grad)
        eps.extend(p.detach() - b for p, b in zip(model.parameters(), before))

    opt.first_step = recording
    opt.step(closure)
    return eps


def ddp_step(rank: int, make_opt) -> tuple[SAM, list[torch.Tensor], list[torch.Tensor]]:
    """One step of ``make_opt(params)`` on this rank's batch through a DDP-wrapped model: (optimizer, eps, weights)."""
    model = tiny()
    ddp = DistributedDataParallel(model)
    x, y = local_batch(rank)
    opt = make_opt(param_groups_by_role(model))
    eps = step_recording_eps(opt, model, sam_closure(ddp, lambda: F.cross_entropy(ddp(x), y), opt))
    return opt, eps, [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, world_size: int) -> dict:
    out = {}
    dist.init_process_group("gloo")
    for local in (True, False):
        _, eps, params = ddp_step(rank, lambda p, m=local: SAM(p, SGD, rho=0.5, m_sharpness=m))
        out[local] = {"eps": eps, "params": params}
    out["masks"] = {}
    for drop in ("gradient", "weight"):
        def ssam(p, d=drop):
            opt = SSAM(p, SGD, rho=0.5, sparsity=0.5, mask_init="random", m_sharpness=True)
            opt.schedule_dynamic_update(0.5, d, "random", seed=3)
            return opt

        opt, _, _ = ddp_step(rank, ssam)
        out["masks"][drop] = [m.clone() for m in opt.masks()]
    leave_process_group()
    next_group_port()
    out["fit"] = {local: fit(world_size, local) for local in (True, False)}
    return out


def fit(devices: int, m_sharpness: bool) -> list[torch.Tensor]:
    """Two SAM steps of ImageClassifier under ``Trainer(strategy="ddp")``; the weights afterwards."""
    torch.manual_seed(0)
    model = ImageClassifier("mlp", 10, backbone_kwargs={"depth": 2, "width": 16},
                            optimizer=lambda p: SAM(p, SGD, rho=0.5, m_sharpness=m_sharpness))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    return [p.detach().clone() for p in model.parameters()]


def reference(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One process, rank ``rank``'s batch: the weights ``w``, the ascent ``eps`` from this batch alone and the gradient
    at ``w + eps`` on this batch."""
    model = tiny()
    x, y = local_batch(rank)
    opt = SAM(param_groups_by_role(model), SGD, rho=0.5)
    closure = sam_closure(model, lambda: F.cross_entropy(model(x), y))
    closure()
    w = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    eps = [p.detach() - b for p, b in zip(model.parameters(), w)]
    closure()
    return w, eps, [p.grad.detach().clone() for p in model.parameters()]


def gradient_survivors() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """SSAM-D in the worker (rate 0.5, sparsity 0.5, the random initial mask): the old mask and the survivors expected
    from the drop scores |g| at w, with g the rank mean of the two local gradients (what the docs promise) and with
    rank 0's local gradient alone (what a missing all-reduce would read)."""
    grads = []
    for rank in (0, 1):
        model = tiny()
        x, y = local_batch(rank)
        params = [p for g in param_groups_by_role(model) for p in g["params"]]  # the masks' order
        grads.append(torch.autograd.grad(F.cross_entropy(model(x), y), params))
    old = SSAM(param_groups_by_role(tiny()), SGD, rho=0.5, sparsity=0.5, mask_init="random").masks()
    keep = drop_grow_counts(sum(m.numel() for m in old), 0.5, 0.5)[0]

    def survivors(gs):
        return global_topk_mask([(g.abs() + 1e-7) * m for g, m in zip(gs, old)], keep)

    return old, survivors([(a + b) / 2 for a, b in zip(*grads)]), survivors(grads[0])


def test_each_rank_ascends_by_its_own_batch_and_the_weights_stay_identical(one_thread):
    r0, r1 = run_ddp(_worker, 2, groups=2)
    refs = [reference(0), reference(1)]
    for r, (_, eps, _) in zip((r0, r1), refs):  # the ascent of each rank: its own batch's gradient and norm
        for got, want in zip(r[True]["eps"], eps):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(r0[True]["eps"], r1[True]["eps"]))
    assert all(torch.equal(a, b) for a, b in zip(r0[False]["eps"], r1[False]["eps"]))  # the default: one ascent
    # descent: SGD's first step with the mean over the ranks of each rank's gradient at its own w + eps
    w = refs[0][0]
    for i, (a, b) in enumerate(zip(r0[True]["params"], r1[True]["params"])):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w[i] - 0.1 * (refs[0][2][i] + refs[1][2][i]) / 2, rtol=RTOL, atol=1e-15)
    for drop in ("gradient", "weight"):  # SSAM-D: drop scores from the rank mean, the same masks everywhere
        assert all(torch.equal(a, b) for a, b in zip(r0["masks"][drop], r1["masks"][drop])), drop
    old, mean_survivors, rank0_survivors = gradient_survivors()  # the mean, not rank 0's gradient, selects them
    assert not all(torch.equal(a, b) for a, b in zip(mean_survivors, rank0_survivors))
    assert all(torch.equal(n & m, e) for n, m, e in zip(r0["masks"]["gradient"], old, mean_survivors))
    for local in (True, False):  # ImageClassifier under the ddp strategy: identical replicas either way ...
        assert all(torch.equal(a, b) for a, b in zip(r0["fit"][local], r1["fit"][local]))
    # ... and the flag reaches its closure (a synced pass 1 would give the default's weights)
    assert any(not torch.equal(a, b) for a, b in zip(r0["fit"][True], r0["fit"][False]))


def test_m_sharpness_changes_nothing_in_one_process(one_thread):
    """Without a process group the gradients are local anyway: the same step with and without the flag."""
    x, y = local_batch(0)
    params = []
    for local in (True, False):
        model = tiny()
        opt = SAM(param_groups_by_role(model), SGD, rho=0.5, m_sharpness=local)
        opt.step(sam_closure(model, lambda m=model: F.cross_entropy(m(x), y), opt))
        assert opt.pass1_local is False  # set only while pass 1 runs
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))
