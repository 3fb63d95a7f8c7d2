"""Paths that need a GPU or a compiler: bf16-mixed training of every optimizer family, channels_last + compile,
GPU-resident data on the device (run with ``pytest -m gpu``), and the torch.compile path on the CPU
(``pytest -m slow``)."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from lightning_methods import ImageClassifier
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.optim import SAMON, KOALAPlusPlus

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _fit(model: ImageClassifier, accelerator: str, precision: str, gpu_resident: bool = False, epochs: int = 3):
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DigitsDataModule(batch_size=64, gpu_resident=gpu_resident))
    return trainer


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", [SGD, partial(SAMON, base_optimizer=SGD, rho=1.0),
                                       partial(KOALAPlusPlus, lr=1.0, sigma=0.1, q=0.1, weight_decay=5e-4)],
                         ids=["sgd", "samon", "koalapp"])
def test_bf16_mixed_training_learns(optimizer):
    L.seed_everything(0)
    model = ImageClassifier("resnet8", 10, optimizer=optimizer, channels_last=True)
    trainer = _fit(model, "gpu", "bf16-mixed", gpu_resident=True)
    assert trainer.callback_metrics["val/acc"] > 0.8
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 autocast keeps fp32 master weights


@pytest.mark.gpu
def test_compile_and_channels_last_on_gpu_keep_parameter_names():
    L.seed_everything(0)
    model = ImageClassifier("resnet20", 10, optimizer=SGD, channels_last=True, compile=True)
    names = [n for n, _ in model.named_parameters()]
    trainer = _fit(model, "gpu", "bf16-mixed", epochs=2)
    assert [n for n, _ in model.named_parameters()] == names
    assert trainer.callback_metrics["val/acc"] > 0.5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compile_on_cpu_trains_and_keeps_checkpoint_keys(tmp_path):
    L.seed_everything(0)
    model = ImageClassifier("resnet8", 10, optimizer=SGD, compile=True)
    keys = set(model.state_dict())
    trainer = _fit(model, "cpu", "32-true", epochs=1)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    assert set(torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"]) == keys
    # it learns: above chance (0.1) by 5 binomial standard deviations of the validation set's size (one epoch on one
    # or two threads ends anywhere from about 0.3 up; the number of threads changes the float results)
    n = len(trainer.val_dataloaders.dataset)
    assert trainer.callback_metrics["val/acc"] > 0.1 + 5 * (0.1 * 0.9 / n) ** 0.5
