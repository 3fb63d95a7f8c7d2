"""The co-training learner of Early Cutting (lightning_methods/noisy_labels.py): mutual distillation loss, EMA copies,
two optimizers / schedulers, the 4-model ensemble, and that ``clean_target`` never reaches the loss."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_methods import CoTrainingClassifier, EMAModel
from lightning_methods.datamodules import IndexedTensorDataset, collate_dict
from lightning_methods.noisy_labels import mutual_kd_loss

from helpers import TinyNet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mutual_kd_loss_by_hand():
    torch.manual_seed(0)
    a = torch.randn(6, 5, requires_grad=True)
    b, c = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    total, ce = mutual_kd_loss(a, y, b, c, temperature=2.0, weight=0.5)
    q = (torch.softmax(b / 2, -1) + torch.softmax(c / 2, -1)) / 2
    log_p = torch.log_softmax(a / 2, -1)
    kl = (q * (q.log() - log_p)).sum(-1).mean()  # batchmean
    assert ce.item() == pytest.approx(F.cross_entropy(a, y).item(), rel=1e-6)
    assert total.item() == pytest.approx(ce.item() + 0.5 * 4 * kl.item(), rel=1e-5)
    total.backward()
    assert a.grad is not None and b.grad is None and c.grad is None  # the peer targets are constants


def test_ema_update_and_buffers():
    net = TinyNet(4)
    ema = EMAModel(net)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.zero_()
        for p in net.parameters():
            p.fill_(1.0)
        net.bn.running_mean.uniform_()
    ema.update(net, 0.999)
    assert all(torch.allclose(p, torch.full_like(p, 0.001)) for p in ema.module.parameters())
    assert torch.equal(ema.module.bn.running_mean, net.bn.running_mean)
    assert not any(p.requires_grad for p in ema.parameters())
    # evaluates with running statistics even inside a module in train mode, and reports train mode afterwards
    ema.train()
    x = torch.randn(3, 3, 8, 8)
    reference = TinyNet(4)
    reference.load_state_dict(ema.module.state_dict())
    assert torch.allclose(ema(x), reference.eval()(x)) and ema.module.training


class _TensorData(LightningDataModule):
    def __init__(self, clean_shift: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(48, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 4, (48,), generator=g)
        self.clean = (self.y + clean_shift) % 4

    def train_dataloader(self) -> DataLoader:
        ds = IndexedTensorDataset(torch.zeros(48, 1, 1, 1, dtype=torch.uint8), self.y,
                                  extras={"clean_target": self.clean})
        ds.images = self.x  # float images: nothing to normalize on the device
        return DataLoader(ds, batch_size=8, shuffle=False, collate_fn=collate_dict)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def _fit(clean_shift: int, checkpoint: Callback | None = None) -> tuple[CoTrainingClassifier, Trainer]:
    seed_everything(0)
    model = CoTrainingClassifier(TinyNet(4), num_classes=4, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                             lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4))
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=checkpoint is not None,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[checkpoint] if checkpoint else None)
    trainer.fit(model, _TensorData(clean_shift))
    return model, trainer


def test_co_training_steps_and_clean_target_never_reaches_the_loss(tmp_path):
    model_a, trainer = _fit(0, ModelCheckpoint(dirpath=tmp_path, save_last=True))
    model_b, _ = _fit(1)  # same run, different clean_target only
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert trainer.global_step == 2 * 2 * 6  # two optimizer steps per batch, 6 batches, 2 epochs
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)  # loadable: callables stored as class paths
    assert [s["last_epoch"] for s in saved["lr_schedulers"]] == [2, 2]  # both schedulers, stepped every epoch
    assert len(saved["optimizer_states"]) == 2
    restored = CoTrainingClassifier.load_from_checkpoint(tmp_path / "last.ckpt", backbone=TinyNet(4))
    assert torch.equal(restored.ema2.module.fc.weight, model_a.ema2.module.fc.weight)
    assert isinstance(restored.configure_optimizers()[0][0], torch.optim.SGD)
    assert not torch.equal(model_a.net1.fc.weight, model_a.net2.fc.weight)  # two differently initialized networks
    ema_moved = not torch.equal(model_a.ema1.module.fc.weight, model_a.net1.fc.weight)
    assert ema_moved
    x = torch.randn(5, 3, 8, 8)
    model_a.eval()
    expected = (model_a.net1(x) + model_a.net2(x) + model_a.ema1(x) + model_a.ema2(x)) / 4
    assert torch.allclose(model_a(x), expected, atol=1e-6)


def test_refuses_fp16_grad_scaler():
    model = CoTrainingClassifier(TinyNet(4), num_classes=4)
    model._trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(ValueError, match="bf16-mixed"):
        model.on_fit_start()
