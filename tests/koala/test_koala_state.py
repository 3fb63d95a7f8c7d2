"""KOALA optimizers: exact state_dict round trips, Lightning checkpoint resume, and data-parallel agreement (the loss
moments are all-reduced: replicas stay identical with different data per rank)."""

from __future__ import annotations

import copy
import io

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_methods.optim.koala_base as koala_base
from lightning_methods import ImageClassifier
from lightning_methods.optim import KOALAM, KOALAV, KOALAPlusPlus, global_loss_moments

from helpers import TinyNet, quiet_trainer, run_ddp

CLASSES = {"KOALAPlusPlus": KOALAPlusPlus, "KOALAV": KOALAV, "KOALAM": KOALAM}


def data(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        return losses.detach()

    return closure


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_round_trip_gives_the_identical_next_step(name):
    torch.manual_seed(0)
    model = TinyNet(4)
    opt = CLASSES[name](model.parameters())
    for k in range(3):
        opt.step(closure_for(model, opt, *data(k)))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # tensors and plain containers only
    twin = TinyNet(4)
    twin.load_state_dict(ckpt["model"])
    twin_opt = CLASSES[name](twin.parameters(), lr=0.123)  # hyperparameters come back from the param groups
    twin_opt.load_state_dict(ckpt["opt"])
    assert twin_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for m, o in ((model, opt), (twin, twin_opt)):
        o.step(closure_for(m, o, *data(9)))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(model.bn.running_var, twin.bn.running_var)
    state_a, state_b = opt.state_dict()["state"], twin_opt.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and "koala" in state_a
    for k, sa in state_a.items():
        assert sa.keys() == state_b[k].keys()
        for key in sa:
            assert sa[key].dtype == state_b[k][key].dtype and torch.equal(sa[key], state_b[k][key]), (k, key)


def _module(opt_cls=KOALAPlusPlus) -> ImageClassifier:
    L.seed_everything(0)
    return ImageClassifier(TinyNet(4), 4, optimizer=lambda p: opt_cls(p, weight_decay=5e-4),
                           lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))


_trainer = quiet_trainer


@pytest.mark.parametrize("opt_cls", [KOALAPlusPlus, KOALAM])
def test_lightning_checkpoint_resume_matches_uninterrupted_run(tmp_path, opt_cls):
    x, y = data(0, 24)
    loader = DataLoader(list(zip(x, y)), batch_size=8, shuffle=False)
    full = _module(opt_cls)
    _trainer(max_epochs=2).fit(full, loader)

    _trainer(max_epochs=1, enable_checkpointing=True,
             callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(_module(opt_cls), loader)
    resumed = _module(opt_cls)
    t2 = _trainer(max_epochs=2)
    t2.fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    assert t2.global_step == 6
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    ckpt = torch.load(tmp_path / "last.ckpt")
    glob = ckpt["optimizer_states"][0]["state"]["koala"]
    assert set(glob) >= {"R", "s_clamps"} and all(isinstance(v, torch.Tensor) for v in glob.values())


def test_global_loss_moments_reduce_to_the_global_means():
    """Two fake ranks with different batch sizes: every rank gets the mean and mean square of all samples."""
    rank0, rank1 = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([3.0, 0.25])
    every = torch.cat([rank0, rank1])

    def stats(v):
        return torch.stack([v.sum(), v.square().sum(), torch.tensor(float(v.numel()))]).double()

    for mine, other in ((rank0, rank1), (rank1, rank0)):
        mean, mean_sq = global_loss_moments(mine, all_reduce=lambda s, o=other: s + stats(o))
        assert mean.item() == pytest.approx(every.mean().item())
        assert mean_sq.item() == pytest.approx(every.square().mean().item())
    mean, mean_sq = global_loss_moments(rank0, offset=1.0, all_reduce=None)
    assert mean.item() == pytest.approx((rank0 + 1).mean().item())
    assert mean_sq.item() == pytest.approx((rank0 + 1).square().mean().item())
    assert global_loss_moments(torch.tensor(2.0))[1].item() == 4.0  # a scalar loss: L2 = L^2


def _ddp_worker(rank: int, world_size: int) -> dict:
    dist.init_process_group("gloo")
    out = {}
    for sync in (True, False):
        if not sync:  # what happens without the reduction: rank-local L and L2
            koala_base.default_all_reduce = lambda: None
        for name, cls in CLASSES.items():
            torch.manual_seed(0)
            model = torch.nn.parallel.DistributedDataParallel(TinyNet(4))
            opt = cls(model.parameters())
            for step in range(3):
                x, y = data(100 * rank + step)  # different data on every rank
                opt.step(closure_for(model, opt, x, y))
            out[name, sync] = [p.detach().clone() for p in model.parameters()]
    return out  # run_ddp leaves the group (after the DDP wrapper is freed)


def test_ddp_replicas_stay_identical():
    results = run_ddp(_ddp_worker, world_size=2)
    for name in CLASSES:
        for a, b in zip(results[0][name, True], results[1][name, True]):
            assert torch.equal(a, b), name
        # the test can fail: without the all-reduce of L and L2 the replicas drift apart
        assert any(not torch.equal(a, b) for a, b in zip(results[0][name, False], results[1][name, False])), name


def test_state_holds_tensors_only_and_scalars_live_in_param_groups():
    torch.manual_seed(0)
    model = TinyNet(4)
    for cls in CLASSES.values():
        opt = cls(model.parameters())
        opt.step(closure_for(model, opt, *data(0)))
        sd = copy.deepcopy(opt.state_dict())
        for per_param in sd["state"].values():
            assert all(isinstance(v, torch.Tensor) for v in per_param.values())
        assert {"lr", "weight_decay", "r", "alpha_r"} <= set(sd["param_groups"][0])
        clone = copy.deepcopy(opt)  # torch pickles only defaults, state and groups: the copy must still step
        clone.step(closure_for(model, clone, *data(1)))


def _lightning_ddp_worker(rank: int, world_size: int) -> list[torch.Tensor]:
    x, y = data(0, 64)
    loader = DataLoader(list(zip(x, y)), batch_size=8, shuffle=True)  # Lightning adds a DistributedSampler
    model = _module(KOALAPlusPlus)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(model, loader)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
def test_lightning_ddp_replicas_stay_identical():
    ranks = run_ddp(_lightning_ddp_worker, world_size=2)
    for a, b in zip(*ranks):
        assert torch.equal(a, b)
