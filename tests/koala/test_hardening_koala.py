"""KOALA++ with extreme sigma / q diverges to NaN; it used to finish with exit code 0 and NaN losses for the whole run
(issue 18, item 9). The NonFiniteGuard stops it at the first non-finite loss and names KOALA's settings."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Callback

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import NonFiniteGuard, NonFiniteTrainingError
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.optim import KOALAPlusPlus

from helpers import TinyNet, quiet_trainer


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def run(guard: bool) -> Losses:
    torch.manual_seed(0)
    model = ImageClassifier(TinyNet(10), 10, optimizer=partial(KOALAPlusPlus, lr=1.0, sigma=1e38, q=1e38))
    losses = Losses()
    callbacks = [losses, NonFiniteGuard()] if guard else [losses]
    quiet_trainer(max_epochs=1, limit_train_batches=6, callbacks=callbacks).fit(model, DigitsDataModule(batch_size=32))
    return losses


def test_extreme_koala_settings_stop_at_the_first_nan_loss(one_thread):
    unguarded = run(guard=False)  # the fault: the whole run goes on with NaN losses
    first = next(i for i, v in enumerate(unguarded.values) if v != v)
    assert len(unguarded.values) == 6 and first < 5
    with pytest.raises(NonFiniteTrainingError, match=r"KOALAPlusPlus\(lr=1, sigma=1e\+38, q=1e\+38") as info:
        run(guard=True)
    assert "KOALA's sigma / q" in str(info.value) and f"global step {first + 1}" in str(info.value)
