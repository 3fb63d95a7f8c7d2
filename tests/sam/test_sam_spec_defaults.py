"""Package defaults of the SAM family against the spec's hyperparameter table (shared/specs/sam_family.md,
"Hyperparameters": package default column) and the timing of the SSAM-F mask callback ("SSAM (official code)")."""

from __future__ import annotations

import inspect
import math
from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import SSAMMaskCallback
from lightning_methods.optim import ASAM, ASAMON, SAM, SAMON, SSAM
from lightning_methods.parameters import param_groups_by_role

from helpers import TinyNet, quiet_trainer

SGD = partial(torch.optim.SGD, lr=0.1)


def build(cls, **kwargs):
    torch.manual_seed(0)
    return cls(param_groups_by_role(TinyNet(num_classes=5, width=4)), SGD, **kwargs)


@pytest.mark.parametrize("cls,kwargs,rho", [
    (SAM, {}, 0.1),  # rho, SAM: 0.1 (CIFAR-100)
    (ASAM, {}, 1.0),  # rho, ASAM: 1.0 (CIFAR-100)
    (SAMON, {}, 1.0),  # rho, SAM-ON: 1.0
    (ASAMON, {}, 10.0),  # rho, ASAM-ON p=2 elementwise: 10
    (ASAMON, {"adaptive": "layerwise"}, 0.5),  # rho, ASAM-ON p=2 layerwise: 0.5
    (ASAMON, {"p": "inf"}, 0.1),  # rho, ASAM-ON p=inf elementwise: 0.1
    (ASAMON, {"p": math.inf}, 0.1),
    (SSAM, {}, 0.1),  # SSAM rho: 0.1
])
def test_default_rho_per_variant(cls, kwargs, rho):
    opt = build(cls, **kwargs)
    assert opt.param_groups[0]["rho"] == rho and opt.defaults["rho"] == rho
    assert build(cls, rho=0.37, **kwargs).param_groups[0]["rho"] == 0.37  # an explicit rho always wins


def test_other_defaults():
    sam = build(SAM)
    assert (sam.perturb, sam.adaptive, sam.p, sam.xi) == ("all", None, 2.0, 1e-12)  # xi: package default 1e-12
    assert (sam.sam_start_epoch, sam.sam_end_epoch, sam.m_sharpness, sam.freeze_non_norm_pass1) == (0, None, False,
                                                                                                 False)
    asam = build(ASAM)
    assert (asam.adaptive, asam.eta, asam.perturb) == ("elementwise", 0.01, "all")  # eta, ASAM: 0.01
    assert (build(SAMON).perturb, build(SAMON).adaptive) == ("only_norm", None)
    asamon = build(ASAMON)
    assert (asamon.adaptive, asamon.eta, asamon.perturb, asamon.p) == ("elementwise", 0.01, "only_norm", 2.0)
    ssam = build(SSAM)
    assert (ssam.sparsity, ssam.mask_init, ssam.mask_norm, ssam.xi) == (0.5, "zeros", "full", 1e-12)
    assert ssam.mask_density() == 0.0  # SSAM-F: the mask starts all zeros
    cb = inspect.signature(SSAMMaskCallback).parameters  # update_freq 1, N_F 128, SSAM-D 0.5 / gradient / random
    assert {k: cb[k].default for k in ("update_freq", "num_samples", "drop_rate", "drop_score", "grow_score")} == {
        "update_freq": 1, "num_samples": 128, "drop_rate": 0.5, "drop_score": "gradient", "grow_score": "random"}
    assert inspect.signature(ImageClassifier).parameters["bn_bypass_second_pass"].default is True


class DensityProbe(Callback):
    """Mask density before and after every training step (listed after the SSAM callback)."""

    def __init__(self):
        self.before, self.after, self.sam = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(trainer.optimizers[0].mask_density())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(trainer.optimizers[0].mask_density())
        self.sam.append([m.clone() for m in trainer.optimizers[0].masks()])


def test_ssamf_mask_is_computed_after_the_step_of_batch_zero_every_update_freq_epochs():
    """Spec: the mask starts all zeros (the first iteration is a plain base step) and is recomputed when
    ``epoch % update_freq == 0`` at batch 0, after that step's SAM update."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g))
    model = ImageClassifier(TinyNet(10), num_classes=10,
                            optimizer=lambda p: SSAM(p, SGD, rho=0.2, sparsity=0.75))
    probe = DensityProbe()
    cb = SSAMMaskCallback(mode="fisher", update_freq=2, num_samples=3, seed=0)
    quiet_trainer(max_epochs=3, callbacks=[cb, probe]).fit(model, DataLoader(data, batch_size=8))
    d = model.trainer.optimizers[0].num_mask_entries()
    k = int(d * 0.25) / d
    # 3 epochs x 3 batches; updates at the end of batch 0 of epochs 0 and 2 only (update_freq = 2)
    assert probe.before == [0.0, k, k, k, k, k, k, k, k]
    assert probe.after == [k] * 9
    assert cb.updates == 2 and cb.last_update_epoch == 2
    masks = probe.sam
    assert all(torch.equal(a, b) for i in range(1, 6) for a, b in zip(masks[0], masks[i]))  # unchanged in epoch 1
