"""NonFiniteGuard (issue 18, item 9): a diverging run stops within a step or two with a message naming the likely
cause and the last good checkpoint, which stays intact; a healthy run is never stopped."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import LatestCheckpoint, NonFiniteGuard, NonFiniteTrainingError
from lightning_methods.checkpoint_io import read_checkpoint
from lightning_methods.datamodules import DigitsDataModule

from helpers import LinearModule, TinyNet, quiet_trainer


class LossRecorder(Callback):
    """Records every training loss (runs before the guard, so it sees the step the guard stops at)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


class ExplodeAt(Callback):
    """Sets the learning rate to ``lr`` at the start of epoch ``epoch``: the next step's loss is NaN."""

    def __init__(self, epoch: int, lr: float = 1e30) -> None:
        self.epoch, self.lr = epoch, lr

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


def model() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(TinyNet(10), 10, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def fit(tmp_path, guard: NonFiniteGuard, explode_epoch: int | None = 1, epochs: int = 3, module=None):
    recorder = LossRecorder()
    callbacks = [recorder, guard, LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")]
    if explode_epoch is not None:
        callbacks.insert(0, ExplodeAt(explode_epoch))
    trainer = quiet_trainer(max_epochs=epochs, limit_train_batches=6, limit_val_batches=1, enable_checkpointing=True,
                            callbacks=callbacks)
    trainer.fit(module or model(), DigitsDataModule(batch_size=32))
    return recorder


def first_bad(losses: list[float]) -> int:
    return next(i for i, v in enumerate(losses) if not torch.isfinite(torch.tensor(v)))


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, one_thread):
    guard = NonFiniteGuard()
    with pytest.raises(NonFiniteTrainingError) as info:
        fit(tmp_path, guard)
    message = str(info.value)
    assert "the training loss became NaN or inf" in message
    assert "SGD(lr=1e+30, momentum=0.9" in message and "learning rate that is too high" in message
    assert "grad_clip_norm" in message
    last = tmp_path / "last.ckpt"
    assert f"--ckpt_path {last}" in message
    saved = read_checkpoint(last)  # verifies the checksum and that every weight is finite
    assert saved["epoch"] == 0 and saved["global_step"] == 6


@pytest.mark.parametrize("lag_on_cpu", [False, True], ids=["cpu-immediate", "cuda-style-lag"])
def test_the_fault_is_seen_within_lag_steps(tmp_path, one_thread, lag_on_cpu):
    guard = NonFiniteGuard(lag_steps=2)
    guard._lag_on_cpu = lag_on_cpu
    recorder = LossRecorder()
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=6, callbacks=[ExplodeAt(1), recorder, guard])
    with pytest.raises(NonFiniteTrainingError):
        trainer.fit(model(), DigitsDataModule(batch_size=32))
    bad = first_bad(recorder.losses)
    assert bad >= 6  # epoch 0 was healthy
    assert len(recorder.losses) - 1 - bad == (2 if lag_on_cpu else 0)  # stopped exactly lag steps later


def _spare_turns_nan_in_epoch_1() -> ImageClassifier:
    """A classifier with a parameter the loss does not use, set to NaN at the start of epoch 1: only the parameter
    check before a save can see it."""

    class Unused(ImageClassifier):
        def on_train_epoch_start(self):
            if self.current_epoch == 1:
                with torch.no_grad():
                    self.spare.fill_(float("nan"))

    torch.manual_seed(0)
    module = Unused(TinyNet(10), 10, optimizer=partial(torch.optim.SGD, lr=0.05))
    module.spare = torch.nn.Parameter(torch.zeros(3))
    return module


def test_a_non_finite_parameter_never_reaches_a_checkpoint(tmp_path, one_thread):
    """A parameter that the loss does not use: only the parameter check before the save can see it."""

    module = _spare_turns_nan_in_epoch_1()
    with pytest.raises(NonFiniteTrainingError, match=r"a parameter or buffer became NaN.*spare") as info:
        fit(tmp_path, NonFiniteGuard(param_check_every_n_steps=0), explode_epoch=None, module=module)
    assert "last.ckpt" in str(info.value)
    assert read_checkpoint(tmp_path / "last.ckpt")["epoch"] == 0


def test_a_checkpoint_written_by_validation_within_fit_is_checked_too(tmp_path, one_thread):
    """Validating less often than every epoch (or several times per epoch) makes the checkpoint callback save at
    the end of validation, while the Trainer is validating, not training: the guard checks that save as well, so NaN
    weights are never written (here without SafeCheckpointIO, the second line of defence)."""

    module = _spare_turns_nan_in_epoch_1()
    checkpoint = LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", safe_io=False)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, check_val_every_n_epoch=2,
                            num_sanity_val_steps=0, enable_checkpointing=True,
                            callbacks=[NonFiniteGuard(param_check_every_n_steps=0), checkpoint])
    with pytest.raises(NonFiniteTrainingError, match=r"a parameter or buffer became NaN.*spare"):
        trainer.fit(module, DigitsDataModule(batch_size=32))
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]  # epoch 0's; validation's save never came
    assert read_checkpoint(tmp_path / "last.ckpt")["epoch"] == 0  # finite (read_checkpoint refuses NaN weights)


def test_a_healthy_run_is_not_stopped(tmp_path, one_thread):
    recorder = fit(tmp_path, NonFiniteGuard(param_check_every_n_steps=1), explode_epoch=None, epochs=2)
    assert len(recorder.losses) == 12 and read_checkpoint(tmp_path / "last.ckpt")["epoch"] == 1


def test_overflowing_batchnorm_statistics_with_a_finite_loss_are_caught(tmp_path, one_thread):
    """lr 1e6 with BatchNorm: the loss stays finite (about 1e6) while running_var overflows to inf."""
    recorder = LossRecorder()
    callbacks = [ExplodeAt(1, lr=1e6), recorder, NonFiniteGuard(),
                 LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")]
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=6, limit_val_batches=1, enable_checkpointing=True,
                            callbacks=callbacks)
    with pytest.raises(NonFiniteTrainingError, match="a parameter or buffer.*running_var"):
        trainer.fit(model(), DigitsDataModule(batch_size=32))
    assert all(torch.isfinite(torch.tensor(v)) for v in recorder.losses)
    assert len(recorder.losses) == 10  # the periodic state check (every 10 steps) sees it before the epoch ends
    assert read_checkpoint(tmp_path / "last.ckpt")["epoch"] == 0


def test_disabled_guard_lets_the_checkpoint_io_refuse_nan_weights(tmp_path, one_thread):
    """Second line of defence: without the guard, SafeCheckpointIO still never overwrites last.ckpt with NaNs."""
    from lightning_methods.checkpoint_io import NonFiniteCheckpointError

    with pytest.raises(NonFiniteCheckpointError, match="refusing to write"):
        fit(tmp_path, NonFiniteGuard(enabled=False))
    assert read_checkpoint(tmp_path / "last.ckpt")["epoch"] == 0




class _NanReportOnRank1(Callback):
    """Makes the guard see a NaN loss on rank 1 only, at step 3 (the weights stay finite on both ranks)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == 2:
            outputs["loss"] = torch.tensor(float("nan"))


def _ddp_guard(rank: int, world_size: int) -> dict:
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=4)
    trainer = quiet_trainer(devices=world_size, strategy=DDPStrategy(timeout=timedelta(seconds=15)), max_epochs=1,
                            callbacks=[_NanReportOnRank1(), NonFiniteGuard()])
    try:
        trainer.fit(LinearModule(), data)
    except NonFiniteTrainingError as err:
        return {"step": trainer.global_step, "message": str(err)}
    return {"step": None, "message": ""}


def test_under_ddp_every_rank_stops_at_the_same_step():
    """A fault seen on one rank only: the flag is all-reduced, so both ranks stop together (no rank is left waiting
    in a collective)."""
    from helpers import run_ddp

    results = run_ddp(_ddp_guard)
    assert [r["step"] for r in results] == [3, 3]
    assert all("the training loss became NaN" in r["message"] for r in results)
