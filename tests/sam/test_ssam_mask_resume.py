"""SSAM-F (Fisher masks) and SAMEpochSync on resume: a fit stopped after epoch 0 and resumed from its checkpoint
gives bit for bit the weights, masks and callback state of the uninterrupted fit, also when the training transform
runs in the dataset (AutoAugment draws from the global CPU RNG, which a resume does not restore)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim import SGD

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import SAMEpochSync, SSAMMaskCallback
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.optim import SAM, SSAM

from helpers import TinyNet, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(tmp_path, max_epochs: int, callback, optimizer, augment: str, ckpt_path=None):
    torch.manual_seed(0 if ckpt_path is None else 7)  # a resumed fit must take everything from the checkpoint
    model = ImageClassifier(TinyNet(10), num_classes=10, optimizer=optimizer)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=True)
    t = quiet_trainer(max_epochs=max_epochs, callbacks=[callback, ckpt], enable_checkpointing=True,
                      limit_train_batches=3)
    t.fit(model, DigitsDataModule(batch_size=16, augment=augment), ckpt_path=ckpt_path)
    return t, model


def _check(tmp_path, make_callback, optimizer, augment: str):
    full_cb = make_callback()
    ta, a = _fit(tmp_path / "full", 3, full_cb, optimizer, augment)
    _fit(tmp_path / "part", 1, make_callback(), optimizer, augment)
    resumed_cb = make_callback()
    tb, b = _fit(tmp_path / "part", 3, resumed_cb, optimizer, augment, str(tmp_path / "part" / "last.ckpt"))
    assert tb.global_step == ta.global_step == 9
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    return ta.optimizers[0], tb.optimizers[0], full_cb, resumed_cb


@pytest.mark.parametrize("augment", ["standard", "autoaugment"])
def test_ssam_fisher_resume_is_bit_identical(tmp_path, augment):
    opt_a, opt_b, cb_a, cb_b = _check(
        tmp_path, lambda: SSAMMaskCallback(mode="fisher", update_freq=2, num_samples=8, seed=1),
        lambda p: SSAM(p, SGD, rho=0.2, sparsity=0.5, lr=0.05, momentum=0.9), augment)
    assert all(torch.equal(m, n) for m, n in zip(opt_a.masks(), opt_b.masks()))
    assert 0 < opt_a.mask_density() < 1
    assert cb_b.state_dict() == cb_a.state_dict() == {"updates": 2, "last_update_epoch": 2}


def test_sam_epoch_window_resume_is_bit_identical(tmp_path):
    opt_a, opt_b, _, _ = _check(
        tmp_path, SAMEpochSync,
        lambda p: SAM(p, SGD, rho=0.2, sam_start_epoch=1, sam_end_epoch=2, lr=0.05, momentum=0.9), "standard")
    assert opt_a.steps == opt_b.steps == 9 and opt_a.epoch == opt_b.epoch == 2
