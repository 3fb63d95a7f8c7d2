"""PredictionHistoryCallback on resume: a fit stopped by the stop rule and resumed from its last.ckpt (killed after
the epoch's checkpoint, before the fit returned) trains no further epoch, as the uninterrupted fit did not."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_methods import CoTrainingClassifier
from lightning_methods.callbacks import PredictionHistoryCallback
from lightning_methods.datamodules import NoisyDigitsDataModule

from helpers import TinyNet, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(tmp_path, ckpt_path: str | None = None):
    seed_everything(0)
    dm = NoisyDigitsDataModule(noise_type="sym", noise_rate=0.4, batch_size=16, eval_batch_size=64)
    dm.setup()
    dm.set_train_subset(dm.train_set.indices[:64].tolist())
    model = CoTrainingClassifier(TinyNet(10, 8), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.1))
    history = PredictionHistoryCallback(warm_up_epochs=0, k=1, keep_rate=0.05, lag=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=True)
    trainer = quiet_trainer(max_epochs=5, callbacks=[history, ckpt], enable_checkpointing=True)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, history


def test_resume_after_the_stop_rule_fired_trains_no_further(tmp_path):
    trainer, history = _fit(tmp_path)
    assert history.stop_epoch is not None and history.stop_epoch < 4  # the rule fired before max_epochs
    step = trainer.global_step
    resumed, resumed_history = _fit(tmp_path, str(tmp_path / "last.ckpt"))
    assert resumed.global_step == step
    assert resumed_history.recorded_epochs == history.recorded_epochs
    assert resumed_history.stop_epoch == history.stop_epoch


def _fit_recording(tmp_path, max_epochs: int, ckpt_path: str | None = None) -> dict[int, torch.Tensor]:
    """The images the prediction pass of every epoch showed the model (AutoAugment runs in the dataset, on the CPU)."""
    seed_everything(0 if ckpt_path is None else 5)  # the global RNG of a resumed fit is not the uninterrupted one's
    dm = NoisyDigitsDataModule(noise_type="sym", noise_rate=0.4, batch_size=16, eval_batch_size=64,
                               augment="autoaugment")
    dm.setup()
    dm.set_train_subset(dm.train_set.indices[:48].tolist())
    model = CoTrainingClassifier(TinyNet(10, 8), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.1))
    seen: dict[int, list[torch.Tensor]] = {}

    def predict(module, batch):
        seen.setdefault(module.current_epoch, []).append(batch["image"].clone())
        return module(batch["image"])

    history = PredictionHistoryCallback(warm_up_epochs=0, k=1, history_transform="train", predict_fn=predict)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=True)
    quiet_trainer(max_epochs=max_epochs, callbacks=[history, ckpt], enable_checkpointing=True).fit(
        model, dm, ckpt_path=ckpt_path)
    return {epoch: torch.cat(images) for epoch, images in seen.items()}


def test_train_transform_history_pass_is_the_same_after_a_resume(tmp_path):
    full = _fit_recording(tmp_path / "full", 3)
    _fit_recording(tmp_path / "part", 2)
    resumed = _fit_recording(tmp_path / "part", 3, str(tmp_path / "part" / "last.ckpt"))
    assert sorted(full) == [1, 2] and sorted(resumed) == [2]
    assert torch.equal(resumed[2], full[2])
    assert not torch.equal(full[1], full[2])  # augmented anew every epoch
