"""The SAM family through Lightning (ImageClassifier's closure contract): steps, BatchNorm statistics, logged loss,
precision / accumulation guards, SSAM mask callbacks and checkpoint resume."""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import SAMEpochSync, SSAMMaskCallback
from lightning_methods.optim import SAM, SSAM

from helpers import TinyNet, quiet_trainer

SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)


def loader(n=64, size=32, batch=16, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False)


def trainer(**kw):
    return quiet_trainer(**{"max_epochs": 1, **kw})


class BNRecorder(Callback):
    """Records, for every forward of the first BatchNorm, the batch mean and whether running stats were tracked."""

    def __init__(self, bn):
        self.calls = []
        bn.register_forward_pre_hook(self.hook)

    def hook(self, module, inputs):
        if module.training:
            self.calls.append((inputs[0].detach().mean(dim=(0, 2, 3)).clone(), module.track_running_stats))


class LossProbe(Callback):
    """Pass-1 loss computed independently on a copy at the pre-step weights, and the logged train/loss."""

    def __init__(self):
        self.expected, self.logged = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        clone = copy.deepcopy(pl_module.backbone)  # train mode, batch statistics; the original is not touched
        with torch.no_grad():
            self.expected.append(F.cross_entropy(clone(batch[0]), batch[1], label_smoothing=0.1).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(trainer.callback_metrics["train/loss_step"].item())


def test_sam_step_through_lightning():
    torch.manual_seed(0)
    model = ImageClassifier("resnet8", num_classes=10, label_smoothing=0.1,
                            optimizer=lambda p: SAM(p, SGD, rho=0.5))
    rec, probe = BNRecorder(model.backbone.bn1), LossProbe()
    rm0 = model.backbone.bn1.running_mean.clone()
    w0 = [p.detach().clone() for p in model.parameters()]
    t = trainer(callbacks=[rec, probe])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, loader(32, 16, batch=8))
    assert not [w for w in caught if "second (perturbed) pass" in str(w.message)]  # ImageClassifier freezes BN
    assert t.global_step == 4  # one optimizer step per batch although the closure runs twice
    assert all(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    tracked = [m for m, on in rec.calls if on]
    assert len(rec.calls) == 8 and len(tracked) == 4  # pass 2 never updates the running statistics
    expected = rm0
    for m in tracked:
        expected = 0.9 * expected + 0.1 * m
    torch.testing.assert_close(model.backbone.bn1.running_mean, expected, atol=1e-6, rtol=0)
    assert int(model.backbone.bn1.num_batches_tracked) == 4
    assert probe.logged == pytest.approx(probe.expected, abs=1e-5)  # the logged loss is the pass-1 loss


def test_precision_and_accumulation_guards():
    def model():
        return ImageClassifier(TinyNet(10), num_classes=10, optimizer=lambda p: SAM(p, SGD, rho=0.1))

    with pytest.raises(ValueError, match="cannot run under precision='16-mixed'.*bf16-mixed"):
        trainer(plugins=[MixedPrecision("16-mixed", "cpu")]).fit(model(), loader(16, 8))
    with pytest.raises(Exception, match="gradient accumulation is not supported for manual optimization"):
        trainer(accumulate_grad_batches=2).fit(model(), loader(16, 8))
    t = trainer(precision="bf16-mixed", max_steps=1)  # bf16 has no scaler: the closure runs inside the step
    m = model()
    t.fit(m, loader(16, 8))
    assert t.global_step == 1 and all(p.dtype == torch.float32 for p in m.parameters())


def test_ssam_fisher_callback_mask_and_bn_untouched():
    torch.manual_seed(1)
    model = ImageClassifier(TinyNet(10), num_classes=10, optimizer=lambda p: SSAM(p, SGD, rho=0.2, sparsity=0.75))
    rec = BNRecorder(model.backbone.bn)
    cb = SSAMMaskCallback(mode="fisher", update_freq=1, num_samples=6, seed=0)
    t = trainer(callbacks=[cb, rec], max_epochs=2)
    t.fit(model, loader(32, 8, batch=8))
    opt = t.optimizers[0]
    d = opt.num_mask_entries()
    assert sum(int(m.sum()) for m in opt.masks()) == int(d * 0.25)  # exact density k / d
    assert cb.updates == 2 and cb.last_update_epoch == 1
    assert sum(on for _, on in rec.calls) == 8  # 8 steps; Fisher passes (12 single samples) track nothing
    assert int(model.backbone.bn.num_batches_tracked) == 8
    with pytest.raises(ValueError, match="mask_init='random'"):
        bad = ImageClassifier(TinyNet(10), num_classes=10, optimizer=lambda p: SSAM(p, SGD, mask_init="zeros"))
        trainer(callbacks=[SSAMMaskCallback(mode="dynamic")]).fit(bad, loader(16, 8))
    with pytest.raises(ValueError, match="exactly one lightning_methods.optim.SSAM"):
        plain = ImageClassifier(TinyNet(10), num_classes=10, optimizer=lambda p: SAM(p, SGD))
        trainer(callbacks=[SSAMMaskCallback()]).fit(plain, loader(16, 8))


def make_ssamd():
    torch.manual_seed(3)
    return ImageClassifier(
        TinyNet(10), num_classes=10,
        optimizer=lambda p: SSAM(p, SGD, rho=0.3, sparsity=0.5, mask_init="random"),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
    )


def test_checkpoint_resume_gives_identical_steps(tmp_path):
    data = loader(32, 8, batch=8)
    model_a = make_ssamd()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1, monitor=None)
    cb_a = SSAMMaskCallback(mode="dynamic", drop_rate=0.5, t_end=3)
    ta = trainer(callbacks=[cb_a, ckpt], max_epochs=2, enable_checkpointing=True)
    ta.fit(model_a, data)
    model_b = make_ssamd()
    cb_b = SSAMMaskCallback(mode="dynamic", drop_rate=0.5, t_end=3)
    tb = trainer(callbacks=[cb_b], max_epochs=2)
    tb.fit(model_b, data, ckpt_path=tmp_path / "epoch=0.ckpt")
    state = torch.load(tmp_path / "epoch=0.ckpt")["optimizer_states"][0]
    assert any("momentum_buffer" in s for s in state["base_optimizer"]["state"].values())
    assert all(s["mask"].dtype == torch.bool for s in state["state"].values())
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    oa, ob = ta.optimizers[0], tb.optimizers[0]
    assert all(torch.equal(a, b) and b.dtype == torch.bool for a, b in zip(oa.masks(), ob.masks()))
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"] < 0.1
    assert ob.param_groups is ob.base_optimizer.param_groups
    assert cb_a.updates == 2 and cb_b.updates == 2  # callback state restored (1) + the epoch-1 update


def test_sam_epoch_window_through_callback():
    torch.manual_seed(0)
    model = ImageClassifier(TinyNet(10), num_classes=10,
                            optimizer=lambda p: SAM(p, SGD, rho=0.1, sam_start_epoch=1, sam_end_epoch=2))
    flags = []

    class Flag(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            flags.append(trainer.optimizers[0].last_step_was_sam)

    trainer(callbacks=[SAMEpochSync(), Flag()], max_epochs=3).fit(model, loader(16, 8, batch=8))
    assert flags == [False, False, True, True, False, False]
