"""Tests from the mutation audit of the stateful callbacks: WarmupEMA's plain (no warm-up) rate, SSAMMaskCallback's
SSAM-D schedule (death rate, t_end, scores, seed per epoch), the Fisher samples (seeded per epoch, split over the
ranks, worker transforms seeded per (seed, epoch, sample), the global RNG untouched) and its state round trip, and
TunnelProbe's schedule (every n-th epoch after the epoch's last validation or at its end, the fit-end label, never in
a sanity check or a standalone validate)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.optim import SGD

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import SSAMMaskCallback, TunnelProbe, WarmupEMA
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.optim import SSAM
from lightning_methods.tunnel import ProbeSettings
from lightning_methods.tunnel.report import TunnelReport
from lightning_methods.utils import mix_seed

from helpers import quiet_trainer

# ------------------------------------------------------------------------------------------------ WarmupEMA


@pytest.mark.parametrize("k", [0, 5, 10**6])
def test_plain_ema_moves_by_one_minus_decay_whatever_the_step(k):
    """``warmup=False`` is a plain EMA: ``ema <- ema - (1 - decay) (ema - w)`` at every step, whatever the count."""
    g = torch.Generator().manual_seed(0)
    averaged, current = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g,
                                                                                       dtype=torch.float64)
    out = WarmupEMA(0.9, warmup=False)._average(averaged.clone(), current, torch.tensor(k))
    expected = averaged - (1.0 - 0.9) * (averaged - current)
    # three float64 roundings of values of the size of |a| + |c|
    scale = float(averaged.abs().max() + current.abs().max())
    torch.testing.assert_close(out, expected, rtol=0, atol=4 * torch.finfo(torch.float64).eps * scale)
    # the wrong rate (decay instead of 1 - decay) moves 9x further: far outside that tolerance
    assert not torch.allclose(out, averaged - 0.9 * (averaged - current))


# ------------------------------------------------------------------------------------------------ SSAM-D schedule


def _ssam(mask_init: str = "random") -> SSAM:
    return SSAM([torch.nn.Parameter(torch.randn(4, 3))], SGD, rho=0.1, sparsity=0.5, mask_init=mask_init, lr=0.1)


def test_ssamd_schedule_uses_the_cosine_rate_to_t_end_the_scores_and_a_seed_per_epoch(monkeypatch):
    """At batch 0 of every ``update_freq``-th epoch the callback schedules one drop/grow with the cosine death rate
    ``drop_rate (1 + cos(pi epoch / t_end)) / 2`` (``t_end`` given: not ``max_epochs``), the configured drop and grow
    scores, and random scores seeded by ``(seed, epoch)``; no other batch or epoch schedules anything."""
    opt = _ssam()
    calls = []
    monkeypatch.setattr(opt, "schedule_dynamic_update",
                        lambda rate, drop, grow, seed: calls.append((rate, drop, grow, seed)))
    cb = SSAMMaskCallback(mode="dynamic", update_freq=2, drop_rate=0.4, drop_score="weight", grow_score="gradient",
                          t_end=5, seed=11)
    for epoch in range(5):
        trainer = SimpleNamespace(optimizers=[opt], current_epoch=epoch, max_epochs=50)
        for batch_idx in range(3):
            cb.on_train_batch_start(trainer, None, None, batch_idx)
    assert [c[1:] for c in calls] == [("weight", "gradient", mix_seed(11, e)) for e in (0, 2, 4)]
    # float64 cosine of the same argument: a few ulps of drop_rate at most
    for (rate, *_), e in zip(calls, (0, 2, 4)):
        assert rate == pytest.approx(0.4 * (1 + math.cos(math.pi * e / 5)) / 2, rel=0, abs=1e-15)
    assert cb.updates == 3 and cb.last_update_epoch == 4

    calls.clear()  # t_end None: the schedule runs to trainer.max_epochs, as officially
    cb = SSAMMaskCallback(mode="dynamic", drop_rate=0.5)
    cb.on_train_batch_start(SimpleNamespace(optimizers=[opt], current_epoch=3, max_epochs=12), None, None, 0)
    assert calls[0][0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 12)) / 2, rel=0, abs=1e-15)


# ------------------------------------------------------------------------------------------------ SSAM-F samples


class _RandomItems(torch.utils.data.Dataset):
    """Item ``i`` carries its index as target and one draw of the global CPU RNG as image (like AutoAugment)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": torch.rand(1, 1, 1), "target": torch.tensor(i)}


def test_fisher_samples_are_seeded_per_epoch_split_over_ranks_and_leave_the_global_rng_alone():
    """The ``num_samples`` Fisher samples are the first of a permutation drawn from ``(seed, epoch)``; rank ``r`` of
    ``w`` takes every ``w``-th from position ``r`` (disjoint shares that together are the whole draw); each sample's
    worker-side randomness comes from ``(seed, epoch, sample)``; the global RNG is as before."""
    cb = SSAMMaskCallback(mode="fisher", num_samples=7, seed=3)
    module = SimpleNamespace(_apply_batch_transfer_handler=lambda batch: batch)
    data = SimpleNamespace(train_set=_RandomItems())
    for epoch in (0, 4):
        expected = torch.randperm(40, generator=torch.Generator().manual_seed(mix_seed(3, epoch)))[:7].tolist()
        shares = []
        for rank in (0, 1):
            trainer = SimpleNamespace(datamodule=data, current_epoch=epoch, global_rank=rank, world_size=2)
            torch.manual_seed(123)
            before = torch.random.get_rng_state()
            got = list(cb.fisher_samples(trainer, module))
            assert torch.equal(torch.random.get_rng_state(), before)
            shares.append([int(t) for _, t in got])
            for image, target in got:
                torch.manual_seed(mix_seed(3, epoch, int(target)))
                assert torch.equal(image.reshape(1), torch.rand(1))
        assert shares == [expected[0::2], expected[1::2]]
    assert (torch.randperm(40, generator=torch.Generator().manual_seed(mix_seed(3, 0)))[:7].tolist()
            != torch.randperm(40, generator=torch.Generator().manual_seed(mix_seed(3, 4)))[:7].tolist())


def test_ssam_callback_state_round_trips():
    """``load_state_dict(state_dict())`` restores both the update count and the epoch of the last update."""
    a = SSAMMaskCallback()
    a.updates, a.last_update_epoch = 5, 8
    b = SSAMMaskCallback()
    b.load_state_dict(a.state_dict())
    assert (b.updates, b.last_update_epoch) == (5, 8) and b.state_dict() == a.state_dict()


# ------------------------------------------------------------------------------------------------ TunnelProbe schedule


def _recording_probe(tmp_path, every_n_epochs: int) -> TunnelProbe:
    """A TunnelProbe whose probe and fit-end plots are stubbed (the schedule is under test, not the probe)."""
    settings = ProbeSettings(max_train_samples=20, max_test_samples=20)
    probe = TunnelProbe(settings=settings, every_n_epochs=every_n_epochs, output_dir=str(tmp_path), log_wandb=False)
    probe.prober.run = lambda *args, **kwargs: TunnelReport([], {})
    probe.prober.check_memory = lambda *args, **kwargs: None
    probe._write_final = lambda trainer: None
    return probe


def _model() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("mlp", 10, backbone_kwargs={"depth": 2, "width": 8},
                           optimizer=lambda p: SGD(p, lr=0.01))


@pytest.mark.parametrize("validate", [True, False])
def test_tunnel_probe_runs_every_n_epochs_and_labels_the_fit_end(tmp_path, validate, one_thread):
    """``every_n_epochs=2`` over 5 epochs of 4 steps: probes after epochs 2 and 4 (after the epoch's last validation,
    never after the mid-epoch one at step 2 of 4; or at the epoch's end without validation) and at fit end, labelled
    epoch 5. Each entry is (epoch label, global step)."""
    probe = _recording_probe(tmp_path, every_n_epochs=2)
    val = dict(limit_val_batches=1, val_check_interval=2) if validate else dict(limit_val_batches=0)
    trainer = quiet_trainer(max_epochs=5, limit_train_batches=4, callbacks=[probe], **val)
    trainer.fit(_model(), DigitsDataModule(batch_size=16))
    assert [(h["epoch"], h["global_step"]) for h in probe.history] == [(2, 8), (4, 16), (5, 20)]


def test_tunnel_probe_skips_sanity_checks_and_standalone_validation(tmp_path, one_thread):
    """The sanity check before training and a ``validate()`` outside ``fit`` never probe, even right after a fit on
    the same Trainer at a due epoch (every 2nd epoch, 3 fitted: the validate runs at epoch index 3) and a new step."""
    probe = _recording_probe(tmp_path / "fit", every_n_epochs=2)
    probe.at_fit_end = False
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1,
                            callbacks=[probe])
    model, dm = _model(), DigitsDataModule(batch_size=16)
    trainer.fit(model, dm)
    assert [(h["epoch"], h["global_step"]) for h in probe.history] == [(2, 4)]
    trainer.validate(model, dm, verbose=False)
    assert [(h["epoch"], h["global_step"]) for h in probe.history] == [(2, 4)]
    other = _recording_probe(tmp_path / "validate", every_n_epochs=1)
    quiet_trainer(limit_val_batches=1, callbacks=[other]).validate(model, dm, verbose=False)
    assert other.history == []
