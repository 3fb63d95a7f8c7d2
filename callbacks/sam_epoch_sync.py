"""Tells SAM-family optimizers the epoch, for ``sam_start_epoch`` / ``sam_end_epoch``."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_methods.optim.sam import SAM


def sam_optimizers(trainer: Trainer) -> list[SAM]:
    """The SAM-family optimizers of ``trainer`` (unwrapped)."""
    return [getattr(o, "optimizer", o) for o in trainer.optimizers if isinstance(getattr(o, "optimizer", o), SAM)]


class SAMEpochSync(Callback):
    """Calls ``set_epoch(trainer.current_epoch)`` on every SAM-family optimizer at the start of each training epoch
    (needed by ``sam_start_epoch`` / ``sam_end_epoch``)."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for opt in sam_optimizers(trainer):
            opt.set_epoch(trainer.current_epoch)
