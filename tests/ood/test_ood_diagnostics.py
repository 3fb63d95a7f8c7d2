"""eta^2 / ANOVA, Delta-mu and encoder selection (lightning_methods.ood.diagnostics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_methods.datamodules import corrupt, load_digits_uint8
from lightning_methods.ood.diagnostics import anova, delta_mu, eta_squared, eta_squared_from_f, select_encoders
from lightning_methods.ood.encoders import EncoderSpec, build_encoder


def test_eta_squared_extremes():
    labels = np.repeat([0, 1, 2], 50)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=150)
    same_means = noise - np.array([noise[labels == c].mean() for c in range(3)])[labels]  # equal class means
    assert eta_squared(same_means, labels) == pytest.approx(0.0, abs=1e-15)
    assert eta_squared(labels * 2.0 + 1.0, labels) == 1.0  # no within-class variance
    assert anova(labels * 2.0, labels)["f"] == float("inf")
    assert eta_squared(np.ones(150), labels) == 0.0


def test_eta_squared_matches_scipy_f_test_identity():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    values = rng.normal(size=200) + 0.4 * labels
    groups = [values[labels == c] for c in range(4)]
    f_scipy = stats.f_oneway(*groups).statistic
    result = anova(values, labels)
    assert result["f"] == pytest.approx(f_scipy, rel=1e-12)
    assert result["eta2"] == pytest.approx(eta_squared_from_f(f_scipy, 200, 4), rel=1e-12)
    assert result["ss_between"] + result["ss_within"] == pytest.approx(result["ss_total"], rel=1e-12)


def test_eta_squared_of_features_is_the_trace_form():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 90)
    feats = rng.normal(size=(90, 4)) + labels[:, None]
    per_dim = [anova(feats[:, j], labels) for j in range(4)]
    expected = sum(r["ss_between"] for r in per_dim) / sum(r["ss_total"] for r in per_dim)
    assert eta_squared(feats, labels) == pytest.approx(expected, rel=1e-12)


def test_delta_mu_is_zero_for_the_identity_corruption(one_thread):
    """Encoder features of the clean and the identity-corrupted images are identical, so are their scores."""
    images, _ = load_digits_uint8()
    images = images[:32]
    encoder, _ = build_encoder(EncoderSpec("r", backbone="resnet8"), num_classes=10)
    def score(x):  # any per-sample score of the features
        return -(encoder(x)[0].double() ** 2).sum(1)

    with torch.no_grad():
        clean, same = score(images), score(corrupt(images, "identity"))
        noisy = score(corrupt(images, "gaussian_noise", severity=5))
    assert delta_mu(clean, same) == 0.0 and delta_mu(clean, same, standardize=True) == 0.0
    assert delta_mu(clean, noisy) != 0.0
    assert delta_mu([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == 1.0
    assert delta_mu([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], standardize=True) == 1.0  # std of the clean scores is 1


def test_select_encoders_rules():
    eta2 = {"dino": 0.3, "clip": 0.6, "resnet": 0.1}
    dmu = {"dino": 5.0, "clip": 1.0, "resnet": 2.0}
    assert select_encoders(eta2, dmu) == ["dino", "clip"]
    assert select_encoders(eta2, dmu, "topk_union", k=2) == ["dino", "clip", "resnet"]
    assert select_encoders(eta2, dmu, "all") == ["dino", "clip", "resnet"]
    with pytest.raises(ValueError, match="names encoders"):
        select_encoders(eta2, {"dino": 1.0})
    with pytest.raises(ValueError, match="unknown selection"):
        select_encoders(eta2, dmu, "best")
