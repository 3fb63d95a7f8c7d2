"""DigitsRegressionDataModule: digits with a real-valued per-image target for the HPN regression / multi-task demos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_methods.datamodules import DigitsRegressionDataModule, digit_regression_values


def test_batches_carry_the_documented_quantity():
    dm = DigitsRegressionDataModule(batch_size=32, image_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "target", "index", "regression_target"}
    assert batch["image"].shape == (32, 3, 8, 8) and batch["regression_target"].dtype == torch.float32
    raw = load_digits()
    idx = batch["index"].numpy()
    np.testing.assert_allclose(batch["regression_target"].numpy(), raw.images[idx].sum(axis=(1, 2)) / 16.0, rtol=1e-6)
    assert torch.equal(batch["target"], torch.from_numpy(raw.target[idx]))
    lo, hi = dm.regression_bounds()
    train_values = raw.images[dm.train_set.indices.numpy()].sum(axis=(1, 2)) / 16.0
    assert (lo, hi) == pytest.approx((train_values.min(), train_values.max()))
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        b = next(iter(loader))
        np.testing.assert_allclose(b["regression_target"].numpy(),
                                   raw.images[b["index"].numpy()].sum(axis=(1, 2)) / 16.0, rtol=1e-6)


def test_row_centroid_and_bad_arguments():
    img = load_digits().images[0]
    expected = (img * np.arange(8)[:, None]).sum() / img.sum()
    assert float(digit_regression_values("row_centroid")[0]) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="quantity must be"):
        DigitsRegressionDataModule(quantity="weight")
    with pytest.raises(ValueError, match="image_size must be"):
        DigitsRegressionDataModule(image_size=2)
