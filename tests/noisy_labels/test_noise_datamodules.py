"""Noisy DataModules: batches with index / noisy target / clean target, the official 45k/5k noisy split, subsets,
saved labels, realized-rate logging, superclass asymmetric noise and CIFAR-N files, on fake data in the real format."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_methods.datamodules import NoisyCIFAR10DataModule, NoisyCIFAR100DataModule, NoisyDigitsDataModule

from helpers import write_fake_cifar


def _dm(cls, root, **kw):
    kw = {"data_dir": str(root), "download": False, "num_workers": 0, "batch_size": 16, **kw}
    return cls(**kw)


def test_batches_carry_index_noisy_and_clean_targets(fake_cifar_root):
    root, arrays = fake_cifar_root
    dm = _dm(NoisyCIFAR100DataModule, root, noise_type="sym", noise_rate=0.4)
    dm.setup("fit")
    clean = torch.from_numpy(arrays["cifar100"]["train_y"])
    assert torch.equal(dm.clean_targets, clean)
    assert 0.25 < (dm.noisy_targets != clean).float().mean() < 0.55
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) >= {"image", "target", "index", "clean_target"}
        assert torch.equal(batch["target"], dm.noisy_targets[batch["index"]])
        assert torch.equal(batch["clean_target"], clean[batch["index"]])
        seen.append(batch["index"])
    assert set(torch.cat(seen).tolist()) <= set(dm.train_set.indices.tolist())
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["target"], dm.noisy_targets[val["index"]])  # noisy validation labels
    test = next(iter(dm.test_dataloader()))
    assert torch.equal(test["target"], torch.from_numpy(arrays["cifar100"]["test_y"])[: len(test["target"])])


def test_official_split_45k_5k_disjoint_and_seeded(fake_cifar_root):
    root, _ = fake_cifar_root
    dm = _dm(NoisyCIFAR10DataModule, root, seed=1)
    train, val = dm.holdout_split(50_000)
    assert len(train) == 45_000 and len(val) == 5_000
    assert len(set(train.tolist()) | set(val.tolist())) == 50_000
    expected = np.sort(np.random.RandomState(1).choice(50_000, 45_000, replace=False))  # official main.py split
    assert np.array_equal(train.numpy(), expected)
    again, _ = _dm(NoisyCIFAR10DataModule, root, seed=1).holdout_split(50_000)
    other, _ = _dm(NoisyCIFAR10DataModule, root, seed=2).holdout_split(50_000)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_train_subset_label_file_and_logged_rates(fake_cifar_root, tmp_path):
    root, _ = fake_cifar_root
    label_file = tmp_path / "labels.pt"
    dm = _dm(NoisyCIFAR10DataModule, root, noise_type="pairflip", noise_rate=0.3, label_file=str(label_file))
    logged = []
    dm.trainer = SimpleNamespace(loggers=[SimpleNamespace(log_metrics=lambda m, step: logged.append(m))])
    dm.setup("fit")
    assert label_file.is_file() and torch.equal(torch.load(label_file)["noisy"], dm.noisy_targets)
    flipped = dm.noisy_targets != dm.clean_targets
    assert logged[-1]["noise/realized_rate"] == pytest.approx(flipped.float().mean().item())
    assert logged[-1]["noise/val_rate"] == pytest.approx(flipped[dm.val_set.indices].float().mean().item())

    subset = dm.train_set.indices[::3]
    np.save(tmp_path / "subset.npy", subset.numpy())
    dm2 = _dm(NoisyCIFAR10DataModule, root, noise_type="pairflip", noise_rate=0.3, label_file=str(label_file),
              train_subset=str(tmp_path / "subset.npy"))
    dm2.setup("fit")
    assert torch.equal(dm2.train_set.indices, subset)
    assert torch.equal(dm2.train_set.targets, dm.noisy_targets[subset])
    assert dm2.noise_stats["noise/train_subset_size"] == len(subset)
    with pytest.raises(ValueError, match="not in the training split"):
        dm2.set_train_subset(dm.val_set.indices[:2].tolist())
    dm2.set_train_subset(None)
    assert torch.equal(dm2.train_set.indices, dm.train_set.indices)

    with pytest.raises(ValueError, match="another setup"):  # the saved labels belong to another noise setting
        _dm(NoisyCIFAR10DataModule, root, noise_type="sym", noise_rate=0.3, label_file=str(label_file)).setup()


def test_superclass_asym_reads_coarse_labels(tmp_path):
    arrays = write_fake_cifar(tmp_path, "cifar100", n_train=500, n_test=20, seed=3)
    perm = np.random.default_rng(0).permutation(100)  # a non-consecutive grouping, like the real superclasses
    path = tmp_path / "cifar-100-python" / "train"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["coarse_labels"] = (perm[arrays["train_y"]] // 5).tolist()
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    dm = _dm(NoisyCIFAR100DataModule, tmp_path, noise_type="asym", noise_rate=0.5, asym_grouping="superclass")
    dm.setup()
    flipped = dm.noisy_targets != dm.clean_targets
    assert flipped.any()
    assert torch.equal(torch.from_numpy(perm)[dm.noisy_targets[flipped]] // 5,
                       torch.from_numpy(perm)[dm.clean_targets[flipped]] // 5)
    consecutive = _dm(NoisyCIFAR100DataModule, tmp_path, noise_type="asym", noise_rate=0.5)
    consecutive.setup()
    f2 = consecutive.noisy_targets != consecutive.clean_targets
    assert torch.equal(consecutive.noisy_targets[f2] // 5, consecutive.clean_targets[f2] // 5)
    with pytest.raises(ValueError, match="asym_grouping"):
        _dm(NoisyCIFAR10DataModule, tmp_path, asym_grouping="superclass")


def test_cifarn_file_through_the_datamodule(fake_cifar_root, tmp_path):
    root, arrays = fake_cifar_root
    clean = arrays["cifar100"]["train_y"]
    noisy = (clean + np.arange(len(clean)) % 2) % 100
    torch.save({"clean_label": clean, "noisy_label": noisy, "noisy_coarse_label": noisy // 5}, tmp_path / "h.pt")
    dm = _dm(NoisyCIFAR100DataModule, root, noise_type="cifarn", cifarn_file=str(tmp_path / "h.pt"))
    dm.setup()
    assert torch.equal(dm.noisy_targets, torch.from_numpy(noisy))
    with pytest.raises(ValueError, match="cifarn_file"):
        _dm(NoisyCIFAR100DataModule, root, noise_type="cifarn")


def test_noisy_digits_split_and_noise():
    dm = NoisyDigitsDataModule(noise_type="sym", noise_rate=0.4, seed=1)
    dm.setup()
    n = len(dm.train_set) + len(dm.val_set)
    assert len(dm.val_set) == n - int(n * 0.9) and len(dm.test_set) > 300
    assert not set(dm.train_set.indices.tolist()) & set(dm.val_set.indices.tolist())
    assert abs((dm.noisy_targets != dm.clean_targets).float().mean().item() - 0.4) < 0.05
    assert dm.train_set.images.shape[-1] == 8
