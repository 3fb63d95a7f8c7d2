"""CIFAR / digits DataModules: exact loading, seeded splits, on-device augmentation, GPU-resident loading, errors."""

from __future__ import annotations

import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_methods.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DeviceBatchLoader,
    DigitsDataModule,
    IndexedTensorDataset,
    collate_dict,
)
from lightning_methods.datamodules.transforms import mix_batch, normalize, random_crop, random_hflip


def _collect(loader):
    return {k: torch.cat([b[k] for b in loader]) for k in ("image", "target", "index")}


@pytest.mark.parametrize("kind,cls", [("cifar100", CIFAR100DataModule), ("cifar10", CIFAR10DataModule)])
def test_cifar_loads_exactly_what_was_written(fake_cifar_root, kind, cls):
    root, arrays = fake_cifar_root
    dm = cls(data_dir=str(root), download=False, batch_size=16, num_workers=0, val_split=0.0)
    dm.prepare_data()
    dm.setup("fit")
    train = _collect(dm._loader(dm.train_set, train=False))  # ordered, all samples
    assert torch.equal(train["image"], torch.from_numpy(arrays[kind]["train_x"]))
    assert torch.equal(train["target"], torch.from_numpy(arrays[kind]["train_y"]))
    assert torch.equal(train["index"], torch.arange(len(arrays[kind]["train_x"])))
    test = _collect(dm.test_dataloader())
    assert torch.equal(test["image"], torch.from_numpy(arrays[kind]["test_x"]))
    assert torch.equal(test["target"], torch.from_numpy(arrays[kind]["test_y"]))
    assert dm.val_set is dm.test_set  # val_split 0 validates on the test set


def test_val_split_is_seeded_disjoint_and_indexed(fake_cifar_root):
    root, arrays = fake_cifar_root

    def split(seed):
        dm = CIFAR100DataModule(data_dir=str(root), download=False, num_workers=0, val_split=0.1, seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = split(0), split(0), split(1)
    assert len(a.val_set) == 20 and len(a.train_set) == 180
    assert torch.equal(a.val_set.indices, b.val_set.indices)
    assert not torch.equal(a.val_set.indices, c.val_set.indices)
    assert set(a.val_set.indices.tolist()).isdisjoint(a.train_set.indices.tolist())
    assert sorted(a.val_set.indices.tolist() + a.train_set.indices.tolist()) == list(range(200))
    # "index" is the position in the full training set: images match the file at that position
    assert torch.equal(a.val_set.images, torch.from_numpy(arrays["cifar100"]["train_x"])[a.val_set.indices])


def test_missing_dataset_without_download_says_where_to_put_it(tmp_path):
    dm = CIFAR100DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python") in msg and "--data.download" in msg and "train" in msg
    with pytest.raises(FileNotFoundError):
        dm.setup("fit")


def test_failed_download_stops_with_the_same_advice(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(RuntimeError, match="cifar-100-python/") as err:
        dm.prepare_data()
    assert "download failed" in str(err.value) and "URLError" in str(err.value)


def test_getitems_batch_equals_per_item_collate():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    ds = IndexedTensorDataset(images, torch.arange(10) % 3, torch.arange(100, 110), extras={"clean": torch.arange(10)})
    idx = [7, 2, 5]
    fast = collate_dict(ds.__getitems__(idx))
    slow = collate_dict([ds[i] for i in idx])
    assert fast.keys() == slow.keys() == {"image", "target", "index", "clean"}
    for k in fast:
        assert torch.equal(fast[k], slow[k])


def test_random_crop_is_a_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros inside: padding is recognisable
    out = random_crop(x, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert matches, f"sample {i} is not a crop of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets really vary


def test_hflip_flips_about_half_and_only_flips():
    torch.manual_seed(0)
    x = torch.rand(400, 3, 4, 4)
    out = random_hflip(x)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_normalize_uses_the_dataset_statistics():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(x, CIFAR100DataModule.mean, CIFAR100DataModule.std)
    expected = (1.0 - torch.tensor(CIFAR100DataModule.mean)) / torch.tensor(CIFAR100DataModule.std)
    assert torch.allclose(out[0, :, 0, 0], expected)
    assert out.dtype == torch.float32
    # float images are already on the 0-1 scale: the same pixels as float give the same output, not 1/255 of it
    # (one division, one subtraction and one division in float32 on both sides: equal up to a few ulps)
    out_float = normalize(x.float() / 255.0, CIFAR100DataModule.mean, CIFAR100DataModule.std)
    assert torch.allclose(out_float, out, rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(out.abs().max()))


def test_on_after_batch_transfer_augments_only_in_training(fake_cifar_root):
    root, _ = fake_cifar_root
    dm = CIFAR10DataModule(data_dir=str(root), download=False, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm._loader(dm.train_set, train=False)))
    plain = normalize(batch["image"], dm.mean, dm.std)
    out = dm.on_after_batch_transfer(dict(batch), 0)  # no trainer attached: evaluation path
    assert torch.equal(out["image"], plain)


def test_mix_batch_with_both_alphas_picks_cutmix_or_mixup_with_a_fair_coin():
    """With CutMix and MixUp both on, the first host draw picks CutMix when it is below 1/2 (timm's
    ``switch_prob`` 0.5): a CutMix image holds only the pixel values of the sample and its partner, a MixUp image
    their blend. Over 40 seeds both happen, each exactly when the replayed draw says so."""
    n = 4
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()
    y = torch.arange(n)
    picks = []
    for seed in range(40):
        img, _ = mix_batch(x, y, n, cutmix_alpha=1.0, mixup_alpha=1.0, rng=np.random.default_rng(seed))
        pure = bool(((img[0] == 0) | (img[0] == n - 1)).all())  # sample 0's partner is sample n - 1
        cutmix = np.random.default_rng(seed).random() < 0.5
        assert pure == cutmix, seed
        picks.append(cutmix)
    assert 0 < sum(picks) < len(picks)


def test_mix_batch_soft_targets_match_the_mixed_area():
    x = torch.zeros(4, 3, 16, 16)
    x[1] = 1.0
    y = torch.tensor([0, 1, 2, 3])
    img, soft = mix_batch(x, y, 5, cutmix_alpha=1.0, rng=np.random.default_rng(3))
    assert torch.allclose(soft.sum(1), torch.ones(4))
    # sample 2's partner is sample 1 (reversed batch): the fraction of ones is the partner's weight
    assert torch.isclose(img[2].mean(), soft[2, 1])
    img, soft = mix_batch(x, y, 5, mixup_alpha=1.0, rng=np.random.default_rng(3))
    assert torch.isclose(img[2, 0, 0, 0], soft[2, 1]) and torch.allclose(soft.sum(1), torch.ones(4))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gpu_resident_loader_visits_every_index_once_per_epoch(world):
    n, bs = 48, 8
    ds = IndexedTensorDataset(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.zeros(n), torch.arange(100, 100 + n))
    for drop_last in (True, False):
        loaders = [DeviceBatchLoader(ds, bs, "cpu", True, drop_last, seed=5, rank=r, world_size=world)
                   for r in range(world)]
        seen = []
        for ld in loaders:
            ld.sampler.set_epoch(3)
            batches = list(ld)
            assert len(batches) == len(ld)
            seen += torch.cat([b["index"] for b in batches]).tolist()
        if n % (bs * world) == 0 or not drop_last:
            assert sorted(seen) == list(range(100, 100 + n))
        assert len(seen) == len(set(seen))
    # the order changes with the epoch and is identical for the same epoch
    ld = DeviceBatchLoader(ds, bs, "cpu", seed=5)
    ld.sampler.set_epoch(0)
    e0 = torch.cat([b["index"] for b in ld])
    ld.sampler.set_epoch(1)
    e1 = torch.cat([b["index"] for b in ld])
    ld.sampler.set_epoch(0)
    assert torch.equal(e0, torch.cat([b["index"] for b in ld])) and not torch.equal(e0, e1)


def test_gpu_resident_loader_gives_every_rank_n_over_world_samples():
    """With ``N`` not a multiple of the world size, every rank visits exactly ``N // world_size`` samples, also in an
    incomplete last batch (``drop_last=False``): the first ``world_size * (N // world_size)`` entries of the epoch's
    permutation, dealt out in turn. Ranks that visit different numbers of samples would disagree on their last batch."""
    n, bs, world = 50, 5, 3
    ds = IndexedTensorDataset(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.zeros(n), torch.arange(n))
    seen = []
    for r in range(world):
        ld = DeviceBatchLoader(ds, bs, "cpu", True, drop_last=False, seed=5, rank=r, world_size=world)
        ld.sampler.set_epoch(2)
        sizes = [len(b["index"]) for b in ld]
        assert sizes == [5, 5, 5, 1]
        seen += torch.cat([b["index"] for b in ld]).tolist()
    assert len(seen) == len(set(seen)) == world * (n // world)


def test_device_augmentation_is_keyed_by_step_and_rank(fake_cifar_root):
    """The batched crop and flip draw from ``(seed, global step, rank)``: the same on a rerun of a step, different on
    another rank (ranks must not crop their batches alike) and at another step."""
    root, _ = fake_cifar_root
    dm = CIFAR10DataModule(data_dir=str(root), download=False, num_workers=0, batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm._loader(dm.train_set, train=False)))

    def augmented(step: int, rank: int) -> torch.Tensor:
        dm.trainer = SimpleNamespace(training=True, global_step=step, global_rank=rank)
        return dm.on_after_batch_transfer(dict(batch), 0)["image"]

    try:
        reference = augmented(3, 0)
        assert torch.equal(augmented(3, 0), reference)
        assert not torch.equal(augmented(3, 1), reference)
        assert not torch.equal(augmented(4, 0), reference)
    finally:
        dm.trainer = None


def test_gpu_resident_rejects_autoaugment():
    with pytest.raises(ValueError, match="gpu_resident"):
        CIFAR100DataModule(gpu_resident=True, augment="autoaugment")


def test_autoaugment_runs_in_the_dataset(fake_cifar_root):
    root, _ = fake_cifar_root
    dm = CIFAR100DataModule(data_dir=str(root), download=False, num_workers=0, augment="autoaugment", batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 32, 32)


def test_digits_split_is_seeded_stratified_and_disjoint():
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    parts = [dm.train_set.indices, dm.val_set.indices, dm.test_set.indices]
    assert sum(len(p) for p in parts) == 1797
    assert len(set(torch.cat(parts).tolist())) == 1797
    assert dm.train_set.images.shape[1:] == (3, 32, 32) and dm.train_set.images.dtype == torch.uint8
    counts = torch.bincount(dm.test_set.targets, minlength=10)
    assert int(counts.min()) >= 25  # every class in the test split
    dm2 = DigitsDataModule(seed=0)
    dm2.setup("fit")
    assert torch.equal(dm2.test_set.indices, dm.test_set.indices)
