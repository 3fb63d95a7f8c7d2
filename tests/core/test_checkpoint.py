"""LatestCheckpoint: ``last.ckpt`` is the latest state after a full run and after a kill, the best checkpoint is kept
separately (Lightning's ModelCheckpoint rewrites ``last.ckpt`` only when the monitored metric improves)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_methods.callbacks import LatestCheckpoint

from helpers import Worsening, quiet_trainer, tiny_loader


def fit(tmp_path, ckpt: ModelCheckpoint, epochs: int = 4, callbacks=()) -> None:
    trainer = quiet_trainer(max_epochs=epochs, enable_checkpointing=True, limit_val_batches=1,
                            callbacks=[ckpt, *callbacks], default_root_dir=tmp_path)
    trainer.fit(Worsening(), tiny_loader(), tiny_loader())


def test_lightning_modelcheckpoint_keeps_an_early_last_ckpt(tmp_path):
    """The fault this callback fixes (if Lightning changes, this test tells us the subclass may go)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_last=True, filename="best")
    fit(tmp_path, ckpt)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 0


def test_last_ckpt_is_the_final_state_and_best_is_kept(tmp_path):
    ckpt = LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best-{epoch:03d}",
                            auto_insert_metric_name=False)
    fit(tmp_path, ckpt)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 3  # epochs 0..3
    assert (tmp_path / "best-000.ckpt").is_file() and ckpt.best_model_path.endswith("best-000.ckpt")


class Kill(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise KeyboardInterrupt  # what a SIGINT does inside fit


def test_after_a_kill_last_ckpt_holds_the_last_finished_epoch(tmp_path):
    ckpt = LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best")
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into a graceful shutdown, then exits
        fit(tmp_path, ckpt, callbacks=[Kill()])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 1 and saved["global_step"] == 8


def test_a_fit_stopped_mid_epoch_saves_its_final_step(tmp_path):
    """``max_steps`` ending the fit inside an epoch (also max_time or a stop rule): ``last.ckpt`` holds that step,
    not the end of the previous epoch (4 batches per epoch, 6 steps: epoch 1 after its second batch)."""
    ckpt = LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best")
    trainer = quiet_trainer(max_epochs=4, max_steps=6, enable_checkpointing=True, limit_val_batches=1,
                            callbacks=[ckpt], default_root_dir=tmp_path)
    trainer.fit(Worsening(), tiny_loader(), tiny_loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert trainer.global_step == 6 and saved["global_step"] == 6 and saved["epoch"] == 1


def test_fast_dev_run_writes_no_checkpoint(tmp_path):
    """A smoke run leaves no checkpoint, as fast_dev_run promises (Lightning 2.6's ModelCheckpoint.on_train_end
    writes ``last.ckpt`` even then, although its own pre-save check skips fast_dev_run everywhere else)."""
    ours = LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    quiet_trainer(fast_dev_run=True, enable_checkpointing=True, callbacks=[ours]).fit(
        Worsening(), tiny_loader(), tiny_loader())
    assert not list(tmp_path.rglob("*.ckpt"))


class LastAtEpochStart(Callback):
    """The epoch of ``last.ckpt`` when each epoch starts (``None``: no file yet)."""

    def __init__(self, directory) -> None:
        self.directory, self.seen = directory, []

    def on_train_epoch_start(self, trainer, pl_module):
        last = self.directory / "last.ckpt"
        self.seen.append(torch.load(last, weights_only=False)["epoch"] if last.is_file() else None)


@pytest.mark.parametrize("setting", [{"check_val_every_n_epoch": 2}, {"limit_val_batches": 0}])
def test_last_ckpt_follows_every_epoch_when_validation_does_not(tmp_path, setting):
    """Validation every other epoch makes the checkpoint callback save at the end of validation only: last.ckpt
    still holds the latest epoch at the start of every epoch, so a crash loses at most the epoch it happened in."""
    ckpt = LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best")
    seen = LastAtEpochStart(tmp_path)
    trainer = quiet_trainer(max_epochs=4, enable_checkpointing=True, callbacks=[ckpt, seen], default_root_dir=tmp_path,
                            **{"limit_val_batches": 1, **setting})
    trainer.fit(Worsening(), tiny_loader(), tiny_loader())
    assert seen.seen == [None, 0, 1, 2]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 3


@pytest.mark.parametrize("safe_io", [True, False])
def test_safe_io_installs_the_verified_writer_or_leaves_lightnings(tmp_path, safe_io):
    """``--checkpoint.safe_io false`` keeps Lightning's own CheckpointIO: no ``.sha256`` records, no digest inside."""
    from lightning_methods.checkpoint_io import DIGEST_KEY, SafeCheckpointIO

    ckpt = LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best", safe_io=safe_io)
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=True, limit_val_batches=1, callbacks=[ckpt])
    trainer.fit(Worsening(), tiny_loader(), tiny_loader())
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO) == safe_io
    assert (tmp_path / "last.ckpt.sha256").is_file() == safe_io
    assert (DIGEST_KEY in torch.load(tmp_path / "last.ckpt", weights_only=True)) == safe_io
