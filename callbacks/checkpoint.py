"""``LatestCheckpoint``: best checkpoints by a monitored metric, and a ``last.ckpt`` that is always the latest state.

Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when a top-k checkpoint is
saved in the same step, i.e. when the monitored metric improves: after a run whose best epoch was early, ``last.ckpt``
holds that early epoch, a resume redoes the later epochs (and logs them twice), and the final weights are never
saved. This subclass also writes ``last.ckpt`` at the end of every epoch in which nothing else was saved, and at the
end of fit, so ``--ckpt_path last`` always continues from where the run stopped.

With ``safe_io=True`` (default) it also makes every checkpoint of the Trainer crash-safe and verified: in ``setup`` it
replaces the strategy's default ``TorchCheckpointIO`` with :class:`lightning_methods.checkpoint_io.SafeCheckpointIO`
(atomic writes, a recorded SHA-256 checked on load, the previous ``last.ckpt`` kept as ``previous-last.ckpt``, NaN/inf
weights never written or loaded).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from lightning_methods.checkpoint_io import install_safe_io


class LatestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the state at the end of every epoch and of fit (see the module
    docstring); every argument is ``ModelCheckpoint``'s (``save_last`` defaults to ``True`` here), plus:

    Args:
        safe_io: install :class:`~lightning_methods.checkpoint_io.SafeCheckpointIO` when the Trainer uses Lightning's
            default ``TorchCheckpointIO`` (a custom CheckpointIO plugin is left alone).

    Example::

        LatestCheckpoint(monitor="val/acc", mode="max", filename="best-{epoch:03d}")  # best-NNN.ckpt + last.ckpt
    """

    def __init__(self, *args, save_last: bool | str | None = True, safe_io: bool = True, **kwargs) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)
        self.safe_io = safe_io

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        with warnings.catch_warnings():  # said in on_fit_start, where a resume is known (it is not empty, of course)
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        if self.safe_io:
            install_safe_io(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        directory = Path(self.dirpath) if self.dirpath and "://" not in str(self.dirpath) else None
        if trainer.is_global_zero and not trainer.ckpt_path and self.save_top_k != 0 and directory is not None \
                and directory.is_dir() and any(directory.iterdir()):
            rank_zero_warn(f"Checkpoint directory {directory} exists and is not empty.")

    def _save_latest(self, trainer: Trainer) -> None:
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return  # something (a top-k or the last checkpoint) was already written for this step
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # every epoch, also when the checkpoints follow validation (run before this hook) and it skipped this epoch
        # (check_val_every_n_epoch > 1): a save of this step at validation end is not repeated
        self._save_latest(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer) and not trainer.sanity_checking:
            self._save_latest(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke test writes no checkpoint (Lightning 2.6's on_train_end saves last.ckpt
            return  # without asking: hundreds of MB per smoke run of a large model)
        super().on_train_end(trainer, pl_module)
        self._save_latest(trainer)  # a fit stopped mid-epoch (max_steps, max_time, a stop rule) is saved too
