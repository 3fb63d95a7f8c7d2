"""OOD image sets read from small files written in the official on-disk formats (no download), corruptions, and the
pipeline's image-set loading (class filters, relabelling, subsampling, calibration splits)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_methods.datamodules import (
    CelebADataModule,
    CIFARCDataModule,
    CorruptedDataModule,
    DigitsDataModule,
    DTDDataModule,
    MNISTDataModule,
    Places365DataModule,
    SamplePatchesDataModule,
    SVHNDataModule,
    corrupt,
    datamodule_split,
    load_digits_uint8,
)
from lightning_methods.ood.config import IDConfig, OODSetConfig
from lightning_methods.ood.datasets import calibration_split, check_disjoint, load_id_sets, load_ood_set


def _jpg(path, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, quality=95)


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [10], [9]], np.uint8)})
    dm = SVHNDataModule(str(tmp_path), download=False)
    dm.prepare_splits(["test"])
    images, labels = dm.load_split("test")
    assert labels.tolist() == [0, 1, 2, 0, 9]  # digit 0 is stored as 10
    assert torch.equal(images[3], torch.from_numpy(x[..., 3]).permute(2, 0, 1))
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        dm.load_split("train")
    with pytest.raises(FileNotFoundError, match="train_32x32.mat and download=False.*internet"):
        dm.prepare_data()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    digits = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    opener, suffix = (gzip.open, ".gz") if gz else (open, "")
    with opener(raw / f"t10k-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 3, 28, 28) + digits.tobytes())
    with opener(raw / f"t10k-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([7, 0, 3]))
    dm = MNISTDataModule(str(tmp_path), download=False, image_size=28)
    images, labels = dm.load_split("test")
    assert labels.tolist() == [7, 0, 3] and images.shape == (3, 3, 28, 28)
    assert torch.equal(images[1, 0], torch.from_numpy(digits[1])) and torch.equal(images[1, 0], images[1, 2])
    assert MNISTDataModule(str(tmp_path), download=False).load_split("test")[0].shape == (3, 3, 32, 32)
    (raw / f"t10k-labels-idx1-ubyte{suffix}").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="IDX"):
        dm.load_split("test")


def test_dtd_official_layout_and_offline_message(tmp_path):
    root = tmp_path / "dtd"
    for cls, color in (("banded", (255, 0, 0)), ("woven", (0, 0, 255))):
        for i in range(2):
            _jpg(root / "images" / cls / f"{cls}_{i:04d}.jpg", (300, 400), color)
    (root / "labels").mkdir()
    (root / "labels" / "test1.txt").write_text("woven/woven_0001.jpg\nbanded/banded_0000.jpg\n")
    dm = DTDDataModule(str(tmp_path), download=False)
    images, labels = dm.load_split("all")
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    assert images[0, 0].float().mean() > 200 and images[3, 2].float().mean() > 200  # red, then blue
    assert dm.load_split("test")[1].tolist() == [1, 0]
    with pytest.raises(FileNotFoundError, match="train1.txt.*download=True"):
        DTDDataModule(str(tmp_path), download=False).prepare_data()


def test_places365_val_and_openood_list(tmp_path):
    root = tmp_path / "places365"
    for i in range(3):
        _jpg(root / "val_256" / f"Places365_val_{i + 1:08d}.jpg", (256, 256), (10 * i, 0, 0))
    (root / "places365_val.txt").write_text("\n".join(f"Places365_val_{i + 1:08d}.jpg {i * 7}" for i in range(3)))
    images, labels = Places365DataModule(str(tmp_path), download=False).load_split("val")
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [0, 7, 14]
    # OpenOOD benchmark list: paths relative to images_classic/, label -1
    classic = tmp_path / "images_classic"
    _jpg(classic / "places365" / "abbey" / "00000002.jpg", (256, 256), (0, 255, 0))
    listing = tmp_path / "test_places365.txt"
    listing.write_text("places365/abbey/00000002.jpg -1\n")
    dm = Places365DataModule(str(tmp_path), image_list=str(listing), image_root=str(classic), download=False)
    images, labels = dm.load_split(dm.test_split)
    assert dm.test_split == "list" and labels.tolist() == [-1] and images[0, 1].float().mean() > 200
    listing.write_text("places365/abbey/missing.jpg -1\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        dm.load_split("list")


def test_celeba_partition(tmp_path):
    root = tmp_path / "celeba"
    for i in range(4):
        _jpg(root / "img_align_celeba" / f"{i + 1:06d}.jpg", (178, 218), (0, 0, 50 * i))
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 2\n000003.jpg 2\n000004.jpg 1\n")
    (root / "identity_CelebA.txt").write_text("000002.jpg 17\n000003.jpg 4\n")
    images, labels = CelebADataModule(str(tmp_path), download=False).load_split("test")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [17, 4]
    (root / "list_eval_partition.txt").write_text("000001.jpg 5\n")
    with pytest.raises(ValueError, match="line 1"):
        CelebADataModule(str(tmp_path), download=False).load_split("train")


def test_cifar_c_release(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    arr = np.zeros((10, 32, 32, 3), np.uint8)
    arr[:, 0, 0, 0] = np.arange(10)
    np.save(folder / "fog.npy", arr)
    np.save(folder / "labels.npy", np.arange(10, dtype=np.uint8) % 3)
    images, labels = CIFARCDataModule(str(tmp_path), corruption="fog", severity=4, download=False).load_split("test")
    assert images[:, 0, 0, 0].tolist() == [6, 7] and labels.tolist() == [0, 1]


def test_tinyimagenet_through_the_shared_reader(tmp_path):
    """The Tiny-ImageNet OOD set uses datamodules/tinyimagenet.py (official folder layout)."""
    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids))
    lines = []
    for k, w in enumerate(wnids):
        _jpg(folder / "train" / w / "images" / f"{w}_0.JPEG", (64, 64), (0, 100 * k, 0))
        _jpg(folder / "val" / "images" / f"val_{k}.JPEG", (64, 64), (100 * k, 0, 0))
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines))
    spec = OODSetConfig("tin", "near", {"class_path": "lightning_methods.datamodules.TinyImageNetDataModule",
                                        "init_args": {"data_dir": str(tmp_path), "download": False, "cache": False,
                                                      "num_workers": 0}}, split="test", classes=[1])
    s = load_ood_set(spec, IDConfig(), None, seed=0)
    assert s.images.shape == (1, 3, 64, 64) and s.targets.tolist() == [1] and s.index.tolist() == [0]


def test_corruptions_are_seeded_per_index_and_scale_with_severity():
    images = load_digits_uint8()[0][:16]
    index = torch.arange(100, 116)
    a = corrupt(images, "gaussian_noise", 3, seed=1, index=index)
    b = corrupt(images[8:], "gaussian_noise", 3, seed=1, index=index[8:])
    assert torch.equal(a[8:], b)  # batch-independent
    assert not torch.equal(a, corrupt(images, "gaussian_noise", 3, seed=2, index=index))
    diffs = [(corrupt(images, "gaussian_noise", s).float() - images.float()).abs().mean() for s in (1, 5)]
    assert diffs[1] > diffs[0] > 0
    assert torch.equal(corrupt(images, "identity"), images)
    for name in ("shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "contrast", "brightness",
                 "saturate", "jpeg", "pixelate"):
        out = corrupt(images, name, 5)
        assert out.dtype == torch.uint8 and out.shape == images.shape and not torch.equal(out, images), name
    gray = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    assert corrupt(gray, "contrast", 5).unique().tolist() == [100]  # contrast keeps the mean
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog")
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "contrast", 6)


def test_corrupted_datamodule_and_sample_patches():
    dm = CorruptedDataModule(DigitsDataModule(seed=0), "pixelate", severity=5, seed=0)
    dm.setup()
    clean_images, _, index = datamodule_split(DigitsDataModule(seed=0), "test")
    assert torch.equal(dm.test_set.indices, index) and not torch.equal(dm.test_set.images, clean_images)
    assert torch.equal(dm.train_set.images, datamodule_split(DigitsDataModule(seed=0), "train")[0])
    patches = SamplePatchesDataModule(num_samples=6).load_split("test")[0]
    assert patches.shape == (6, 3, 32, 32) and patches.float().std() > 10


def test_id_sets_relabel_and_calibration_splits():
    cfg = IDConfig("d", {"class_path": "lightning_methods.datamodules.DigitsDataModule", "init_args": {"seed": 0}},
                   classes=[7, 3], max_test_samples=20)
    _, sets = load_id_sets(cfg, seed=0)
    assert set(sets["fit"].targets.tolist()) == {0, 1} and len(sets["test"].index) == 20
    _, again = load_id_sets(cfg, seed=0)
    assert sets["fit"].fingerprint == again["fit"].fingerprint
    split = calibration_split(sets["fit"].index, [0.2, 0.1], seed=0)
    assert sum(len(v) for v in split.values()) == len(sets["fit"].index)
    check_disjoint(split["rdm_train"], {"calib_1": split["calib_1"], "calib_2": split["calib_2"]})
    with pytest.raises(ValueError, match="overlap the RDM training split"):
        check_disjoint(split["rdm_train"], {"calib_1": split["rdm_train"][:3], "calib_2": split["calib_2"]})
    with pytest.raises(ValueError, match="calib_fractions"):
        calibration_split(sets["fit"].index, [0.6, 0.5], seed=0)
