"""Audit of the small-image DataModules: loaders of the OOD sets, the corrupted set's normalization, DDP shards
without repeats, clear errors for damaged files, the crop's offset range against torchvision, seeded worker-side
augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_methods.datamodules import (
    CIFAR100DataModule,
    CorruptedDataModule,
    DigitsDataModule,
    IndexedTensorDataset,
    SamplePatchesDataModule,
    SVHNDataModule,
)
from lightning_methods.datamodules.base import EpochShuffleSampler, training_sampler
from lightning_methods.datamodules.transforms import random_crop


def test_ood_datamodules_build_their_loaders():
    # OODImageDataModule once overrode the base's _require("train_set") with its split check: every loader raised
    dm = SamplePatchesDataModule(num_samples=6, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert len(dm.train_dataloader()) == 1 and len(dm.val_dataloader()) == 2
    with pytest.raises(ValueError, match="has the splits"):  # the split check itself still works
        dm.load_split("val")


def test_corrupted_set_normalizes_with_the_statistics_of_its_base():
    # DigitsDataModule computes its mean / std in setup; the corrupted set copied the placeholders (0, 1) before
    base = DigitsDataModule(seed=0)
    dm = CorruptedDataModule(base, "identity", severity=1)
    dm.setup("fit")
    assert dm.mean == base.mean and dm.std == base.std and base.mean != (0.0, 0.0, 0.0)
    x = dm.test_set.images[:2]
    out = dm.on_after_batch_transfer({"image": x.clone(), "target": torch.zeros(2)}, 0)["image"]
    ref = base.on_after_batch_transfer({"image": x.clone(), "target": torch.zeros(2)}, 0)["image"]
    assert torch.equal(out, ref)


class _FakeDDPTrainer:
    def __init__(self, rank: int, world: int) -> None:
        self.distributed_sampler_kwargs = {"num_replicas": world, "rank": rank}
        self.overfit_batches = 0


@pytest.mark.parametrize("n,world", [(10, 3), (11, 4), (12, 3)])
def test_ddp_worker_shards_never_repeat_a_sample(n, world):
    # Lightning's DistributedSampler padded the shards to ceil(n / world) with repeats of the first positions, so up to
    # world - 1 samples ran twice in one epoch (and the GPU-resident loader, which keeps world * (n // world), differed)
    seen = []
    for rank in range(world):
        sampler = training_sampler(EpochShuffleSampler(n, seed=3), _FakeDDPTrainer(rank, world))
        sampler.set_epoch(2)
        shard = list(sampler)
        assert len(shard) == len(sampler) == n // world
        seen += shard
    assert len(seen) == len(set(seen)) == world * (n // world)


def test_random_crop_equals_torchvision_pad4_crop_on_the_same_draws():
    # torchvision RandomCrop(32, padding=4): constant zero padding, then a 32x32 window whose top / left are uniform
    # in 0..8 (torch.randint(0, 40 - 32 + 1)); random_crop draws all tops, then all lefts, from its generator
    from torchvision.transforms.v2 import functional as TF

    n = 2000
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = random_crop(x, 4, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    oy, ox = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    for i in range(0, n, 7):
        ref = TF.crop(TF.pad(x[i], [4], fill=0, padding_mode="constant"), int(oy[i]), int(ox[i]), 32, 32)
        assert torch.equal(out[i], ref)
    counts = torch.bincount(oy * 9 + ox, minlength=81)
    # all 81 windows, (0, 0) and (8, 8) included; 2000 / 81 = 24.7 per window, a count outside [5, 55] has
    # binomial probability < 1e-5 per window
    assert len(counts) == 81 and int(counts.min()) >= 5 and int(counts.max()) <= 55


def test_a_damaged_svhn_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "svhn").mkdir()
    bad = tmp_path / "svhn" / "test_32x32.mat"
    bad.write_bytes(b"not a matlab file" * 8)
    dm = SVHNDataModule(str(tmp_path), download=False, train_split="test")
    with pytest.raises(ValueError, match="test_32x32.mat") as err:
        dm.load_split("test")
    assert "download" in str(err.value) or "replace" in str(err.value)


@pytest.mark.parametrize("augment", ["autoaugment", "colorjitter"])
def test_worker_side_augmentation_is_a_function_of_seed_epoch_and_index(fake_cifar_root, augment):
    # AutoAugment / ColorJitter drew from the global RNG (of the process or of each worker): a resumed run, another
    # worker count or other global draws changed them; now each sample's draw comes from (seed, epoch, index)
    root, _ = fake_cifar_root

    def epoch_images(epoch, noise):
        dm = CIFAR100DataModule(data_dir=str(root), download=False, num_workers=0, augment=augment, batch_size=50,
                                seed=4)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(noise)  # the global RNG must not matter
        batches = list(loader)
        order = torch.cat([b["index"] for b in batches]).argsort()
        return torch.cat([b["image"] for b in batches])[order]

    a, b, c = epoch_images(1, 0), epoch_images(1, 123), epoch_images(2, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another epoch, other draws


def test_tagged_keys_seed_the_transform_and_leave_the_global_rng_alone():
    from torchvision.transforms import v2

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = IndexedTensorDataset(images, torch.zeros(6), torch.arange(10, 16), v2.ColorJitter(0.4, 0.4, 0.4), seed=2)
    state = torch.get_rng_state()
    one = ds.__getitems__([(3, 5), (1, 5)])
    assert torch.equal(torch.get_rng_state(), state)
    other = ds.__getitems__([(1, 5), (0, 5), (3, 5)])  # another batch, order and worker: the same per-sample draws
    assert torch.equal(one[0]["image"], other[2]["image"]) and torch.equal(one[1]["image"], other[0]["image"])
    assert not torch.equal(ds[(3, 6)]["image"], one[0]["image"])  # the next epoch draws anew
    assert torch.equal(ds[(3, 5)]["index"], torch.tensor(13))


def test_digits_applies_its_worker_side_augment():
    # DigitsDataModule built its datasets itself and dropped augment="colorjitter" / "autoaugment" silently
    dm = DigitsDataModule(seed=0, augment="colorjitter", batch_size=32)
    dm.setup("fit")
    assert dm.train_set.transform is not None
    batch = next(iter(dm.train_dataloader()))
    pos = {int(i): p for p, i in enumerate(dm.train_set.indices)}
    raw = dm.train_set.images[[pos[int(i)] for i in batch["index"]]]
    assert batch["image"].shape == raw.shape and not torch.equal(batch["image"], raw)


@pytest.mark.parametrize("draw", range(6))
def test_cutmix_box_and_labels_follow_the_official_rand_bbox(draw):
    # clovaai/CutMix-PyTorch: lam ~ Beta(a, a); cut = sqrt(1 - lam); box of int(W * cut) x int(H * cut) around a
    # uniform centre, clipped; the label weight is the exact kept area; the partner is the batch in reverse order
    from lightning_methods.datamodules.transforms import mix_batch

    h, w, n = 32, 24, 5
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).clone()
    y = torch.tensor([0, 1, 2, 3, 4])
    img, soft = mix_batch(x, y, 5, cutmix_alpha=1.0, rng=np.random.default_rng(draw))
    rng = np.random.default_rng(draw)
    lam = rng.beta(1.0, 1.0)
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    x1, x2 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    for i in range(n):
        expected = torch.where(inside, float(n - 1 - i), float(i))
        assert torch.equal(img[i, 0], expected)
    kept = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    for i in range(n):
        ref = torch.zeros(5)
        ref[i] += kept
        ref[n - 1 - i] += 1.0 - kept
        assert torch.allclose(soft[i], ref, atol=1e-6)  # float32 of a float64 weight: rounding only
