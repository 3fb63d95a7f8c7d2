"""Early Cutting checks added after a mutation audit: each pins a line whose change the other tests did not notice
(Yuan et al., arXiv 2502.08227; official code tmllab/2025_NeurIPS_MEE). Integer rounding of the cut's fractions,
the FkL tie-break on unsorted base indices, the noise seed versus the split seed, and one co-training step (peer-EMA
targets, EMA after the optimizer step) against a hand-written reference."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_methods import CoTrainingClassifier
from lightning_methods.datamodules import IndexedTensorDataset, NoisyCIFAR100DataModule, collate_dict
from lightning_methods.datamodules.label_noise import make_noisy_labels
from lightning_methods.noisy_labels import mutual_kd_loss
from lightning_methods.noisy_labels.selection import cut_subset, fkl_order, mee_from_candidates

from helpers import TinyNet, quiet_trainer

# ------------------------------------------------------------------------------------------ selection arithmetic


def test_fkl_ties_are_broken_by_base_index_whatever_the_input_order():
    """``fkl_order`` orders by first-learned epoch, ties by base index (documented), also when the indices are not
    given sorted; -1 (never learned) is left out."""
    first = torch.tensor([9, 9, 8, 9, -1, 8])
    indices = torch.tensor([40, 10, 30, 20, 5, 70])
    assert fkl_order(first, indices).tolist() == [30, 70, 10, 20, 40]
    assert fkl_order(first, indices, upto_epoch=8).tolist() == [30, 70]


@pytest.mark.parametrize("n,expected", [(46, 30), (47, 31), (2, 1), (1, 1), (3, 2)])
def test_cut_subset_is_the_floor_of_n_over_the_cutting_rate(n, expected):
    """Spec: subset = FkL[: floor(|FkL| / early_cutting_rate)] (at least one sample): 46 / 1.5 = 30.67 -> 30 and
    47 / 1.5 = 31.33 -> 31, where rounding to nearest would give 31 and 31; 2 / 1.5 = 1.33 -> 1."""
    fkl = torch.arange(100, 100 + n)
    assert cut_subset(fkl, 1.5).tolist() == list(range(100, 100 + expected))


def test_mee_quantile_counts_are_truncated_and_at_least_one():
    """MEE = top int(q_c · N) by confidence ∩ bottom int(q_g · N) by input-gradient norm, each count at least one
    (official code). With N = 13 and q = 0.2, int(2.6) = 2 samples per criterion (rounding would take 3); with
    N = 4, int(0.8) = 0 is raised to 1."""
    cand = torch.arange(13) + 500
    # confidence ranks: 500 > 501 > 502 > ...; gradient norm ranks (low first): 502 < 501 < 500 < ...
    conf = torch.linspace(1.0, 0.1, 13, dtype=torch.float64)
    grad = torch.arange(13, dtype=torch.float64) + 10
    grad[:3] = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    # top-2 conf = {500, 501}, bottom-2 grad = {502, 501} -> {501}; with 3 each it would be {500, 501, 502}
    assert mee_from_candidates(cand, conf, grad, 0.2, 0.2).tolist() == [501]
    small = torch.tensor([7, 8, 9, 6])
    conf4 = torch.tensor([0.2, 0.9, 0.5, 0.1], dtype=torch.float64)
    grad4 = torch.tensor([3.0, 0.5, 2.0, 4.0], dtype=torch.float64)
    assert mee_from_candidates(small, conf4, grad4, 0.2, 0.2).tolist() == [8]


# ------------------------------------------------------------------------------------------ noise seed


def test_noise_seed_draws_the_labels_and_is_checked_by_the_label_file(fake_cifar_root, tmp_path):
    """``noise_seed`` (default: ``seed``) seeds the label noise only: the labels are
    ``make_noisy_labels(..., seed=noise_seed)``, the 90/10 split stays the one of ``seed``, and a saved label file
    generated with another noise seed is refused instead of silently reused."""
    root, arrays = fake_cifar_root
    clean = arrays["cifar100"]["train_y"]

    def dm(**kw):
        kw = {"data_dir": str(root), "download": False, "num_workers": 0, "noise_type": "sym", "noise_rate": 0.4,
              "seed": 1, **kw}
        module = NoisyCIFAR100DataModule(**kw)
        module.setup("fit")
        return module

    default, other = dm(), dm(noise_seed=2, label_file=str(tmp_path / "labels.pt"))
    assert np.array_equal(default.noisy_targets.numpy(), make_noisy_labels(clean, "sym", 0.4, 100, seed=1))
    assert np.array_equal(other.noisy_targets.numpy(), make_noisy_labels(clean, "sym", 0.4, 100, seed=2))
    assert not torch.equal(default.noisy_targets, other.noisy_targets)
    assert torch.equal(default.train_set.indices, other.train_set.indices)  # the split follows seed, not noise_seed
    assert torch.equal(dm(noise_seed=2, label_file=str(tmp_path / "labels.pt")).noisy_targets, other.noisy_targets)
    with pytest.raises(ValueError, match="another setup"):
        dm(noise_seed=3, label_file=str(tmp_path / "labels.pt"))


# ------------------------------------------------------------------------------------------ co-training step


def test_one_co_training_step_by_hand():
    """One batch of ``CoTrainingClassifier`` with plain SGD equals the spec's recipe written out: net a minimizes
    CE + w·T²·KL((σ(z_b/T) + σ(z_b_ema/T))/2 ‖ σ(z_a/T)) with the PEER's network and the PEER's EMA as target, each
    net takes its own SGD step, and only then the EMA moves, θ_ema ← d·θ_ema + (1 − d)·θ_new, BN buffers copied.
    EMA decay 0.5 (any value in (0, 1) is the same rule) makes an EMA taken before the step differ by 0.5·lr·g."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    ds = IndexedTensorDataset(torch.zeros(8, 1, 1, 1, dtype=torch.uint8), y)
    ds.images = x  # float images: nothing to normalize on the device
    data = DataLoader(ds, batch_size=8, shuffle=False, collate_fn=collate_dict)
    model = CoTrainingClassifier(TinyNet(4), num_classes=4, ema_decay=0.5,
                                 optimizer=partial(torch.optim.SGD, lr=0.1))
    ref = copy.deepcopy(model).train()
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(model, data)  # two optimizer steps = one batch
    assert model.trainer.global_step == 2

    with torch.no_grad():
        e1, e2 = ref.ema1(x), ref.ema2(x)
    z1, z2 = ref.net1(x), ref.net2(x)
    loss1, _ = mutual_kd_loss(z1, y, z2.detach(), e2, temperature=2.0, weight=0.5)
    loss2, _ = mutual_kd_loss(z2, y, z1.detach(), e1, temperature=2.0, weight=0.5)
    # float32 tiny net, the same ops in the same order: differences are a few ulps of values of order 1 (atol 1e-6)
    tol = {"atol": 1e-6, "rtol": 1e-5}
    for net, ref_net, ema, ref_ema, loss in ((model.net1, ref.net1, model.ema1, ref.ema1, loss1),
                                             (model.net2, ref.net2, model.ema2, ref.ema2, loss2)):
        params = list(ref_net.parameters())
        grads = torch.autograd.grad(loss, params)
        new = [p.detach() - 0.1 * gr for p, gr in zip(params, grads)]
        for p, q in zip(net.parameters(), new):
            torch.testing.assert_close(p.detach(), q, **tol)
        for p_ema, p0, q in zip(ema.module.parameters(), ref_ema.module.parameters(), new):
            torch.testing.assert_close(p_ema, 0.5 * p0 + 0.5 * q, **tol)
        for b_ema, b in zip(ema.module.buffers(), ref_net.buffers()):  # BN statistics after the one forward
            torch.testing.assert_close(b_ema, b, **tol)
