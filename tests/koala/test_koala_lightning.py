"""KOALA optimizers inside ImageClassifier: learning on a separable toy set, one optimizer step per batch, the
monitor's statistics reaching the logger, bf16-mixed running, 16-mixed refused."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import KOALAMonitor
from lightning_methods.optim import KOALAM, KOALAPlusPlus

from helpers import TinyNet, quiet_trainer


def toy_loader(n: int = 128, classes: int = 4, bs: int = 16, seed: int = 0) -> DataLoader:
    """Images of one random colour per class plus noise: separable after global pooling, learnable by TinyNet."""
    g = torch.Generator().manual_seed(seed)
    colours = 2 * torch.randn(classes, 3, 1, 1, generator=g)
    y = torch.arange(n) % classes
    x = colours[y] + 0.5 * torch.randn(n, 3, 8, 8, generator=g)
    return DataLoader(list(zip(x, y)), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))


class EpochLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss_epoch"]))


def module(opt_cls=KOALAPlusPlus, **kw) -> ImageClassifier:
    L.seed_everything(0)
    return ImageClassifier(TinyNet(4), 4, optimizer=lambda p: opt_cls(p, **kw))


trainer = quiet_trainer


@pytest.mark.parametrize("opt_cls", [KOALAPlusPlus, KOALAM])
def test_learns_a_separable_toy_task_with_one_step_per_batch(opt_cls, tmp_path):
    losses = EpochLosses()
    t = trainer(max_epochs=4, callbacks=[losses, KOALAMonitor()], logger=CSVLogger(tmp_path), log_every_n_steps=2)
    model = module(opt_cls)
    t.fit(model, toy_loader())
    assert t.global_step == 4 * 8  # one optimizer step per batch (128 samples, batch 16)
    assert losses.losses[-1] < 0.3 * losses.losses[0], losses.losses
    opt = t.optimizers[0]
    assert opt.s_clamp_count is not None and int(opt.s_clamp_count) == 0
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("koala/s_clamps")]
    assert logged and float(logged[-1]["koala/s_clamps"]) == 0.0
    r_logged = float(logged[-1]["koala/R"])
    assert 0 < r_logged < 1.0  # R0 = 1 pulled towards mean squared losses of a task being learned
    if opt_cls is KOALAM:
        assert any(r.get("koala/P_xx") for r in rows)


def test_bf16_mixed_runs_with_fp32_state():
    t = trainer(max_epochs=1, limit_train_batches=2, precision="bf16-mixed")
    model = module()
    t.fit(model, toy_loader())
    opt = t.optimizers[0]
    assert t.global_step == 2
    states = [s for k, s in opt.state.items() if k != "koala"]
    assert states and all(s["v"].dtype == torch.float32 for s in states)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_16_mixed_and_gradient_accumulation_are_refused():
    # a real 16-mixed precision plugin (Lightning turns precision="16-mixed" on CPU into bf16-mixed)
    t = trainer(max_epochs=1, limit_train_batches=1, plugins=[MixedPrecision("16-mixed", "cpu")])
    with pytest.raises(ValueError, match="KOALAPlusPlus cannot run under precision='16-mixed'"):
        t.fit(module(), toy_loader())
    # the step reads the current loss: accumulating gradients over batches is refused (by Lightning, manual opt.)
    with pytest.raises(MisconfigurationException, match="gradient accumulation is not supported"):
        trainer(max_epochs=1, limit_train_batches=2, accumulate_grad_batches=2).fit(module(), toy_loader())
