"""Protocol data: the Tiny-ImageNet reader on files in the official layout, its errors, the DataModule, ColorJitter
in workers, and CutMix label mass and pasted area."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from vit_locality_tiny_files import write_fake_tinyimagenet

import lightning_methods.datamodules.tinyimagenet as tiny
from lightning_methods.datamodules import CIFAR100DataModule, TinyImageNetDataModule, load_tinyimagenet_split
from lightning_methods.datamodules.transforms import mix_batch


def _pil(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)


def test_reader_follows_the_official_layout(tmp_path):
    folder = write_fake_tinyimagenet(tmp_path, wnids=("n02", "n01", "n03"), per_class=3, n_val=5)
    x, y = load_tinyimagenet_split(tmp_path, "train")
    assert x.dtype == torch.uint8 and x.shape == (9, 3, 64, 64) and y.dtype == torch.int64
    # classes are the sorted wnids (ImageFolder order), not the order of wnids.txt
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert np.array_equal(x[0].numpy(), _pil(folder / "train" / "n01" / "images" / "n01_0.JPEG"))
    gray = x[3]  # n02_0 was written as a grayscale JPEG: converted to three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    xv, yv = load_tinyimagenet_split(folder, "val")  # the release folder itself works too
    assert xv.shape == (5, 3, 64, 64)
    assert yv.tolist() == [1, 0, 2, 1, 0]  # annotation order: n02, n01, n03, n02, n01
    assert np.array_equal(xv[2].numpy(), _pil(folder / "val" / "images" / "val_2.JPEG"))


def test_reader_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    folder = write_fake_tinyimagenet(tmp_path, per_class=2, n_val=3)
    x, y = load_tinyimagenet_split(tmp_path, "val", cache=True)
    assert (folder / "lightning_methods_val.pt").is_file()
    monkeypatch.setattr(tiny, "_decode", lambda path: (_ for _ in ()).throw(AssertionError("decoded again")))
    x2, y2 = load_tinyimagenet_split(tmp_path, "val", cache=True)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with open(folder / "val" / "val_annotations.txt", "a") as f:  # a changed split is decoded again
        f.write("val_0.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(AssertionError, match="decoded again"):
        load_tinyimagenet_split(tmp_path, "val", cache=True)


def test_reader_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip"):
        load_tinyimagenet_split(tmp_path / "none", "train")
    with pytest.raises(ValueError, match="no labels"):
        load_tinyimagenet_split(tmp_path, "test")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    with pytest.raises(RuntimeError, match="download failed.*network unreachable"):
        load_tinyimagenet_split(tmp_path / "none", "train", download=True)
    folder = write_fake_tinyimagenet(tmp_path / "bad", per_class=1, n_val=2)
    with open(folder / "val" / "val_annotations.txt", "a") as f:
        f.write("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="line 3"):
        load_tinyimagenet_split(folder, "val")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "train" / "n01" / "images" / "n01_0.JPEG")
    with pytest.raises(ValueError, match="64x64, got 32x32"):
        load_tinyimagenet_split(folder, "train")


def test_datamodule_batches(tmp_path):
    write_fake_tinyimagenet(tmp_path, per_class=4, n_val=6)
    dm = TinyImageNetDataModule(data_dir=str(tmp_path), download=False, batch_size=4, num_workers=0, cache=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 200 and len(dm.train_set) == 12 and len(dm.test_set) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and set(batch) >= {"image", "target", "index"}
    with pytest.raises(FileNotFoundError, match="download=False"):
        TinyImageNetDataModule(data_dir=str(tmp_path / "none"), download=False).prepare_data()


def test_colorjitter_runs_per_sample_in_workers(fake_cifar_root):
    root, arrays = fake_cifar_root
    dm = CIFAR100DataModule(data_dir=str(root), download=False, num_workers=0, augment="colorjitter", batch_size=8)
    dm.setup("fit")
    from torchvision.transforms import v2

    assert isinstance(dm.train_set.transform, v2.ColorJitter)
    assert dm.train_set.transform.brightness == (0.6, 1.4) and dm.train_set.transform.saturation == (0.6, 1.4)
    torch.manual_seed(0)
    item = dm.train_set[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    assert not torch.equal(item["image"], dm.train_set.images[0])
    assert dm.test_set.transform is None
    with pytest.raises(ValueError, match="gpu_resident"):
        CIFAR100DataModule(gpu_resident=True, augment="colorjitter")


def test_cutmix_label_mass_and_pasted_area():
    torch.manual_seed(0)
    n, classes = 6, 10
    image = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()  # image i == i
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    for seed in range(20):
        mixed, soft = mix_batch(image, target, classes, cutmix_alpha=1.0, rng=np.random.default_rng(seed))
        torch.testing.assert_close(soft.sum(-1), torch.ones(n))
        for i in range(n):
            partner = n - 1 - i
            pasted = float((mixed[i, 0] == partner).float().mean())
            lam = float(soft[i, target[i]])
            assert lam == pytest.approx(1.0 - pasted, abs=1e-6)  # own-label mass == kept area
            assert float(soft[i, target[partner]]) == pytest.approx(pasted, abs=1e-6)
            assert bool(((mixed[i, 0] == i) | (mixed[i, 0] == partner)).all())  # one box, no blending
