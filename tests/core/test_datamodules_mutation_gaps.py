"""Tests from the mutation audit of the small-image DataModules: published normalization constants, the MNIST train
files and the OOD sets' test split, corruption severity indexing, per-index corruption of a DataModule's splits,
the CINIC-10 cache invalidation, federated client data (labels, client tags, stratified test pool, statistics,
small clients, augmentation seed), instance noise with an absent class, singleton asymmetric groups, the digits
splits and statistics, and the OOD image helpers (centre crop of the shorter side, antialiased resize, OOD label)."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_methods.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CINIC10DataModule,
    CorruptedDataModule,
    DigitsDataModule,
    DigitsRegressionDataModule,
    FederatedDataModule,
    MNISTDataModule,
    SVHNDataModule,
    corrupt,
    datamodule_split,
    load_digits_uint8,
    read_image_list,
)
from lightning_methods.datamodules.cinic10 import CINIC10_CLASSES
from lightning_methods.datamodules.label_noise import group_cyclic_transition
from lightning_methods.datamodules.ood_images import load_image, resize_uint8
from lightning_methods.datamodules.transforms import device_augment, normalize
from lightning_methods.federated.partition import PartitionSettings
from lightning_methods.utils import mix_seed

# ------------------------------------------------------------------------------------------------ constants


@pytest.mark.parametrize("cls, classes, mean, std", [
    # per-channel statistics of the training sets as published and used by the reference code bases: CIFAR-10 with
    # the true pixel std (0.2470, not the often copied 0.2023), CIFAR-100, SVHN (train), MNIST (torchvision's
    # example), CINIC-10 (the README of the release)
    (CIFAR10DataModule, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    (CIFAR100DataModule, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    (SVHNDataModule, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    (MNISTDataModule, 10, (0.1307,) * 3, (0.3081,) * 3),
    (CINIC10DataModule, 10, (0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835)),
])
def test_normalization_constants_and_class_counts_are_the_published_ones(cls, classes, mean, std):
    assert cls.num_classes == classes
    assert cls.mean == pytest.approx(mean, abs=1e-8) and cls.std == pytest.approx(std, abs=1e-8)


# ------------------------------------------------------------------------------------------------ MNIST, OOD splits


def _write_idx(raw, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, *images.shape) + images.tobytes())
    with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, len(labels)) + labels.astype(np.uint8).tobytes())


def test_mnist_reads_the_train_files_for_train_and_the_ood_test_split_for_test(tmp_path):
    """``train`` reads ``train-*``, ``test`` reads ``t10k-*``; ``setup`` serves ``test_split`` as the test set;
    ``datamodule_split`` of a named split gives positions ``0..N-1`` as sample ids."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (5, 3))
    _write_idx(raw, "train", train_x, np.array([1, 2, 3, 4, 5]))
    _write_idx(raw, "t10k", test_x, np.array([9, 8, 7]))
    dm = MNISTDataModule(str(tmp_path), download=False, image_size=28)
    images, labels = dm.load_split("train")
    assert labels.dtype == torch.int64 and labels.tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(images[:, 0], torch.from_numpy(train_x))
    dm.setup("fit")
    assert dm.test_set.targets.tolist() == [9, 8, 7] and torch.equal(dm.test_set.images[:, 1], torch.from_numpy(test_x))
    assert dm.train_set.targets.tolist() == [1, 2, 3, 4, 5]
    _, targets, index = datamodule_split(MNISTDataModule(str(tmp_path), download=False, image_size=28), "train")
    assert targets.tolist() == [1, 2, 3, 4, 5] and index.tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ corruptions


@pytest.mark.parametrize("severity, c", [(1, 0.75), (2, 0.5), (3, 0.4), (4, 0.3), (5, 0.15)])
def test_contrast_severity_s_uses_the_official_s_th_factor(severity, c):
    """make_cifar_c.py: ``contrast`` with ``c = [.75, .5, .4, .3, .15][severity - 1]``: ``(x - mean) c + mean`` per
    image and channel, then ``np.uint8(clip(., 0, 1) * 255)`` (truncation)."""
    images = load_digits_uint8()[0][:6]
    x = images.permute(0, 2, 3, 1).numpy().astype(np.float64) / 255.0
    mean = x.mean(axis=(1, 2), keepdims=True)
    expected = np.uint8(np.clip((x - mean) * c + mean, 0, 1) * 255)
    out = corrupt(images, "contrast", severity).permute(0, 2, 3, 1).numpy()
    # the same float64 formula: a few ulps apart at most, which truncation can turn into one grey level
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_corrupted_datamodule_keys_the_draws_by_dataset_index_and_corrupts_train_on_request():
    """Every split's corruption draws from ``(seed, index)`` with the base's sample ids (not batch positions); with
    ``corrupt_train`` the training split is corrupted too, otherwise it is the clean one."""
    base = DigitsDataModule(seed=0)
    dm = CorruptedDataModule(base, "gaussian_noise", severity=2, seed=4, corrupt_train=True)
    dm.setup()
    for split, ds in (("train", dm.train_set), ("test", dm.test_set)):
        clean, targets, index = datamodule_split(DigitsDataModule(seed=0), split)
        assert not torch.equal(index, torch.arange(len(index)))  # sample ids differ from positions here
        assert torch.equal(ds.images, corrupt(clean, "gaussian_noise", 2, seed=4, index=index))
        assert torch.equal(ds.targets, targets) and torch.equal(ds.indices, index)


# ------------------------------------------------------------------------------------------------ CINIC-10


def _png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)


def test_cinic_cache_is_rebuilt_when_the_folder_gains_files(tmp_path):
    """The uint8 cache is keyed by the number of files: a split that gains an image is read again, not served stale."""
    for split in ("train", "test"):
        for label, cls in enumerate(CINIC10_CLASSES):
            _png(tmp_path / "CINIC-10" / split / cls / "a.png", label)
    first = CINIC10DataModule(str(tmp_path), download=False, num_workers=0)
    first.setup("fit")
    assert len(first.train_set) == 10 and (tmp_path / "CINIC-10" / ".cache" / "train_uint8.pt").is_file()
    _png(tmp_path / "CINIC-10" / "train" / "cat" / "b.png", 200)
    again = CINIC10DataModule(str(tmp_path), download=False, num_workers=0)
    again.setup("fit")
    assert len(again.train_set) == 11
    assert again.train_set.targets.tolist() == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]
    assert again.train_set.images[4].unique().tolist() == [200]


# ------------------------------------------------------------------------------------------------ federated


def test_federated_digits_clients_hold_true_labels_their_tag_and_a_stratified_test_pool():
    """Every client's local train and test samples carry their digit's true label and the client's id; the test
    pool is 25% of every class (rounded); ``set_client`` validates on that client's test set; the normalization is
    that of the training pool (float32 sums of ~1.3M values in [0, 1]: relative error < 1e-5)."""
    dm = FederatedDataModule("digits", partition=PartitionSettings(num_clients=3, scheme="iid"), batch_size=8)
    dm.setup()
    images, targets = load_digits_uint8()
    label_of = {}
    for img, t in zip(images, targets.tolist()):
        label_of.setdefault(img.numpy().tobytes(), set()).add(t)
    for sets in (dm.client_train, dm.client_test):
        for i, ds in enumerate(sets):
            assert (ds.extras["client"] == i).all()
            assert all(int(t) in label_of[img.numpy().tobytes()] for img, t in zip(ds.images, ds.targets))
    test_counts = torch.bincount(torch.cat([d.targets for d in dm.client_test]), minlength=10)
    assert test_counts.tolist() == [round(0.25 * int(n)) for n in torch.bincount(targets, minlength=10)]
    train = torch.cat([d.images for d in dm.client_train]).double() / 255
    assert len(train) + int(test_counts.sum()) == 1797
    assert dm.mean == pytest.approx(train.mean(dim=(0, 2, 3)).tolist(), rel=1e-5)
    assert dm.std == pytest.approx(train.std(dim=(0, 2, 3)).tolist(), rel=1e-5)
    dm.set_client(2, round=1)
    assert dm.val_set is dm.client_test[2] and dm.train_set is dm.client_train[2]


def test_federated_client_smaller_than_a_batch_still_trains():
    """``drop_last`` only where a full batch exists: a client with fewer samples than the batch size gets one
    partial batch per epoch instead of none."""
    dm = FederatedDataModule("digits", partition=PartitionSettings(num_clients=3, scheme="iid"), batch_size=4096)
    dm.setup()
    n = len(dm.client_train[1])
    assert n < 4096
    batches = list(dm.client_loader(1, "train", train=True))
    assert len(batches) == 1 and sorted(batches[0]["index"].tolist()) == sorted(dm.client_train[1].indices.tolist())


def test_federated_device_augmentation_is_keyed_by_seed_client_round():
    """In training, crop/flip draw from ``(mix_seed(seed, client, round) % 2**31, global_step, rank)``, and the
    DataModule's own seed is unchanged afterwards."""
    dm = FederatedDataModule("digits", partition=PartitionSettings(num_clients=3, scheme="iid"), batch_size=8,
                             augment="standard", seed=5)
    dm.setup()
    batch = next(iter(dm.client_loader(0, "train")))
    dm.trainer = SimpleNamespace(training=True, global_step=7, global_rank=0)
    outs = []
    for client, rnd in ((1, 2), (2, 2)):
        dm.set_client(client, rnd)
        out = dm.on_after_batch_transfer(dict(batch), 0)["image"]
        assert dm.seed == 5
        stream = mix_seed(5, client, rnd) % 2**31
        gen = torch.Generator().manual_seed(mix_seed(stream, 7, 0))
        assert torch.equal(out, normalize(device_augment(batch["image"], "standard", gen), dm.mean, dm.std))
        outs.append(out)
    assert not torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------ label noise


def test_singleton_and_ungrouped_classes_keep_their_label():
    """A class alone in its group, or in no group, never flips (its row is the identity row)."""
    P = group_cyclic_transition(5, 0.3, [[0], [1, 2, 3]])
    np.testing.assert_array_equal(P[0], np.eye(5)[0])
    np.testing.assert_array_equal(P[4], np.eye(5)[4])
    np.testing.assert_allclose(P[3], [0, 0.3, 0, 0.7, 0], rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------ digits


def test_digits_pixels_are_rounded_not_truncated():
    """At the native 8x8 size the uint8 image is ``round(v / 16 * 255)`` of the 0..16 values (the resize is the
    identity there), repeated to 3 channels."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images, targets = load_digits_uint8(8)
    expected = torch.from_numpy(np.round(raw.images / 16.0 * 255).astype(np.uint8))
    assert torch.equal(images[:, 0], expected) and torch.equal(images[:, 2], expected)
    assert targets.tolist() == raw.target.tolist()


def test_digits_split_sizes_follow_each_fraction_and_statistics_come_from_train():
    """Per class ``round(test_fraction n_c)`` test and ``round(val_fraction n_c)`` validation samples; mean / std are
    those of the training images (float32 sums over ~1.2M values in [0, 1]: relative error < 1e-5)."""
    dm = DigitsDataModule(val_fraction=0.1, test_fraction=0.25, seed=0)
    dm.setup("fit")
    counts = torch.bincount(load_digits_uint8()[1], minlength=10)
    assert torch.bincount(dm.test_set.targets, minlength=10).tolist() == [round(0.25 * int(n)) for n in counts]
    assert torch.bincount(dm.val_set.targets, minlength=10).tolist() == [round(0.1 * int(n)) for n in counts]
    train = dm.train_set.images.double() / 255
    assert dm.mean == pytest.approx(train.mean(dim=(0, 2, 3)).tolist(), rel=1e-5)
    assert dm.std == pytest.approx(train.std(dim=(0, 2, 3)).tolist(), rel=1e-5)
    small = DigitsRegressionDataModule(image_size=8, seed=0)
    small.setup("fit")
    train8 = small.train_set.images.double() / 255
    assert small.train_set.images.shape[-1] == 8
    assert small.mean == pytest.approx(train8.mean(dim=(0, 2, 3)).tolist(), rel=1e-5)
    assert small.std == pytest.approx(train8.std(dim=(0, 2, 3)).tolist(), rel=1e-5)


def test_digits_worker_augmentation_is_keyed_by_the_datamodule_seed():
    """A worker-side policy draws from ``(seed, epoch, index)`` with the DataModule's seed: the same sample at the
    same epoch is augmented like a dataset with that seed and unlike one with another seed."""
    from lightning_methods.datamodules import IndexedTensorDataset

    dm = DigitsDataModule(seed=7, augment="colorjitter")
    dm.setup("fit")
    ds = dm.train_set
    same, other = (IndexedTensorDataset(ds.images, ds.targets, ds.indices, ds.transform, seed=s) for s in (7, 0))
    assert torch.equal(ds[(3, 2)]["image"], same[(3, 2)]["image"])
    assert not torch.equal(ds[(3, 2)]["image"], other[(3, 2)]["image"])


# ------------------------------------------------------------------------------------------------ OOD image helpers


def test_load_image_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    """A 64x32 (w x h) image at size 32: the shorter side is already 32, so the result is columns 16..47."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 3
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[..., 0], arr[:, 16:48, 0])


def test_resize_uint8_is_antialiased_bilinear_and_repeats_grey():
    """Halving a linear ramp ``4 col`` with an antialiased (triangle, symmetric) filter gives the ramp at the output
    pixel centres, ``8 j + 2``, away from the borders (a symmetric filter preserves linear functions); grey input
    becomes 3 equal channels."""
    ramp = (torch.arange(64) * 4).to(torch.uint8).expand(1, 1, 64, 64).contiguous()
    out = resize_uint8(ramp, 32)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], out[:, 2])
    assert out[0, 0, 5, 2:30].tolist() == [8 * j + 2 for j in range(2, 30)]
    # a quarter-size of columns 255, 0, 0, 0, ...: the triangle filter of half-width 4 centred on input position
    # 4 j + 2 weighs the two lit columns at distances 1.5 and 2.5 by 0.625 and 0.375 (weights sum to 4), so interior
    # outputs are 255 / 4 = 63.75 -> 64; a bilinear resize without antialiasing reads columns 4 j + 1, 4 j + 2 -> 0
    stripes = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    stripes[..., ::4] = 255
    assert resize_uint8(stripes, 16)[0, 0, 1:15, 1:15].unique().tolist() == [64]


def test_image_list_lines_without_a_label_are_ood(tmp_path):
    """OpenOOD lists: ``<path> <label>``; a line without a label is an OOD sample, label -1 (never class 0)."""
    path = tmp_path / "list.txt"
    path.write_text("id/a.png 3\n\nood/b.png\nood/c.png   \n")
    assert read_image_list(path) == [("id/a.png", 3), ("ood/b.png", -1), ("ood/c.png", -1)]
