"""Feature preprocessing (the RDM code's PCA and normalisation, fitted on ID-train only) and the feature DataModule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ood_helpers import gaussian_features
from sklearn.covariance import EmpiricalCovariance

from lightning_methods.ood.features import EmbeddingDataModule, EmbeddingSet, FeaturePreprocessor, context_labels
from lightning_methods.utils import atomic_torch_save


def test_pca_matches_the_official_procedure():
    """RDM run.py: EmpiricalCovariance(assume_centered=True), eigenvectors of the largest eigenvalues, x @ NS."""
    rng = np.random.default_rng(0)
    train = torch.tensor(rng.normal(size=(200, 10)) @ rng.normal(size=(10, 10)) + 0.5)
    pre = FeaturePreprocessor("raw", pca_dim=4).fit(train)
    cov = EmpiricalCovariance(assume_centered=True).fit(train.numpy()).covariance_
    vals, vecs = np.linalg.eig(cov)
    ns = vecs.T[np.argsort(-vals)[:4]].T
    test = torch.tensor(rng.normal(size=(5, 10)))
    ours = pre(test).double().numpy()
    official = test.numpy() @ ns
    signs = np.sign((ours * official).sum(0))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(ours, official * signs, rtol=1e-5, atol=1e-5)
    assert pre.out_dim == 4
    assert FeaturePreprocessor("raw", pca_dim=16).fit(train).projection is None  # only when wider


def test_variants_use_train_statistics_only():
    train = gaussian_features(300, 3, seed=0).features * torch.tensor([1.0, 5.0, 0.1]) + 2
    std = FeaturePreprocessor("standardize", None).fit(train)
    z = std(train).double()
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    shift = (std(train + 10) - std(train)).double()  # other data is transformed with the training statistics
    torch.testing.assert_close(shift, (10 / (std.std + 1e-8)).expand(300, 3), rtol=1e-4, atol=0)
    l2 = FeaturePreprocessor("l2", None).fit(train)(train)
    torch.testing.assert_close(l2.norm(dim=1), torch.full((300,), 3**0.5), rtol=1e-5, atol=0)
    restored = FeaturePreprocessor.from_state_dict(std.state_dict())
    assert torch.equal(restored(train), std(train))


def test_feature_dimension_mismatch_is_named():
    pre = FeaturePreprocessor("raw", None).fit(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="do not match the encoder's dimension 8"):
        pre(torch.zeros(2, 6))
    with pytest.raises(RuntimeError, match="not fitted"):
        FeaturePreprocessor()(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="variant"):
        FeaturePreprocessor("whiten")
    with pytest.raises(ValueError, match="logits"):
        context_labels(None)


def test_embedding_datamodule_from_files(tmp_path):
    train = gaussian_features(50, 4, seed=0, classes=3)
    other = EmbeddingSet(torch.randn(7, 4), torch.arange(10, 17), torch.zeros(7, dtype=torch.long),
                       logits=torch.randn(7, 3))
    atomic_torch_save(train.to_dict(), tmp_path / "train.pt")
    atomic_torch_save(other.to_dict(), tmp_path / "ood.pt")
    dm = EmbeddingDataModule(str(tmp_path / "train.pt"), predict_paths=[str(tmp_path / "ood.pt")],
                             variant="standardize", pca_dim=None, batch_size=16, eval_batch_size=5, num_classes=3)
    dm.setup()
    assert dm.num_classes == 3 and dm.feature_dim == 4
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"feature", "index", "target"} and batch["feature"].shape == (16, 4)
    loader = dm.predict_dataloader()[0]
    rows = torch.cat([b["index"] for b in loader])
    assert rows.tolist() == list(range(10, 17))
    cond = EmbeddingDataModule.from_sets(other, {"x": other}, conditional=True, pca_dim=None)
    cond.setup()
    assert torch.equal(cond.dataset("train").tensors["context"], (1 + other.logits.argmax(1)).float())
    with pytest.raises(ValueError, match="not a feature file"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        EmbeddingDataModule(str(tmp_path / "bad.pt")).setup()


@pytest.mark.parametrize("drop", ["targets", "index"])
def test_feature_file_without_a_required_entry_names_it(tmp_path, drop):
    """`lightning-methods fit --config configs/ood/rdm_features.yaml --data.init_args.train_path FEATS.pt` on a
    user's own file: a missing entry is a ValueError naming the file, the entry and the format (was KeyError)."""
    data = gaussian_features(20, 4, seed=0, classes=2).to_dict()
    del data[drop]
    torch.save(data, tmp_path / "feats.pt")
    with pytest.raises(ValueError, match=rf"feats\.pt lacks \['{drop}'\].*'targets': int64"):
        EmbeddingDataModule(str(tmp_path / "feats.pt"), pca_dim=None).setup()
