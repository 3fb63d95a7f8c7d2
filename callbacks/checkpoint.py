"""``LatestCheckpoint``: best checkpoints by a monitored metric, and a ``last.ckpt`` that is always the latest state.

Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when a top-k checkpoint is
saved in the same step, i.e. when the monitored metric improves: after a run whose best epoch was early, ``last.ckpt``
holds that early epoch, a resume redoes the later epochs (and logs them twice), and the final weights are never
saved. This subclass also writes ``last.ckpt`` at the end of every epoch in which nothing else was saved, and at the
end of fit, so ``--ckpt_path last`` always continues from where the run stopped.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LatestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the state at the end of every epoch and of fit (see the module
    docstring); every argument is ``ModelCheckpoint``'s (``save_last`` defaults to ``True`` here).

    Example::

        LatestCheckpoint(monitor="val/acc", mode="max", filename="best-{epoch:03d}")  # best-NNN.ckpt + last.ckpt
    """

    def __init__(self, *args, save_last: bool | str | None = True, **kwargs) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)

    def _save_latest(self, trainer: Trainer) -> None:
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return  # something (a top-k or the last checkpoint) was already written for this step
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer) and not trainer.sanity_checking:
            self._save_latest(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_latest(trainer)  # a fit stopped mid-epoch (max_steps, max_time, a stop rule) is saved too
