"""Covariate-shift sets: :class:`CorruptedDataModule` (CIFAR-C-style corruptions of any image DataModule, generated on
the fly with a seed and a severity, see :mod:`.corruptions`) and :class:`CIFARCDataModule` (the released CIFAR-10-C /
CIFAR-100-C arrays of Hendrycks & Dietterich, arXiv 1903.12261).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightning_methods.datamodules.base import ImageDataModule, IndexedTensorDataset
from lightning_methods.datamodules.corruptions import ALIASES, CORRUPTIONS, corrupt
from lightning_methods.datamodules.ood_images import OODImageDataModule

CIFAR_C_URLS = {"CIFAR-10-C": "https://zenodo.org/record/2535967/files/CIFAR-10-C.tar",
                "CIFAR-100-C": "https://zenodo.org/record/3555552/files/CIFAR-100-C.tar"}


def datamodule_split(dm: ImageDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(uint8 images, int64 targets, int64 sample ids)`` of a split of any image DataModule: a named split of the
    OOD sets (``load_split``), else ``"train"`` / ``"val"`` / ``"test"`` after ``setup``.

    Raises:
        ValueError: an unknown split name.
    """
    if hasattr(dm, "load_split") and split in getattr(dm, "splits", ()):
        dm.prepare_splits([split])
        images, targets = dm.load_split(split)
        return images, targets, torch.arange(len(images))
    if split not in ("train", "val", "test"):
        known = tuple(getattr(dm, "splits", ())) or ("train", "val", "test")
        raise ValueError(f"{type(dm).__name__} has no split {split!r}; use one of {known}")
    dm.prepare_data()
    dm.setup("fit")
    ds: IndexedTensorDataset = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}[split]
    return ds.images, ds.targets, ds.indices


class CorruptedDataModule(ImageDataModule):
    """Another DataModule's images under a seeded CIFAR-C-style corruption (synthetic covariate shift).

    Args:
        base: the clean image DataModule (e.g. ``CIFAR100DataModule``).
        corruption: a name of :data:`lightning_methods.datamodules.corruptions.CORRUPTIONS`.
        severity: 1..5.
        seed: seed of the corruption's random draws (per image: ``(seed, index)``).
        corrupt_train: also corrupt the training split (default: only validation and test).
        batch_size: batch size (the base's by default).
    """

    def __init__(self, base: ImageDataModule, corruption: str = "gaussian_noise", severity: int = 3, seed: int = 0,
                 corrupt_train: bool = False, batch_size: int | None = None) -> None:
        name = ALIASES.get(corruption, corruption)
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {corruption!r}; choose one of {CORRUPTIONS}")
        if not 1 <= severity <= 5:
            raise ValueError(f"severity must be in 1..5, got {severity}")
        super().__init__(batch_size=batch_size or base.batch_size, eval_batch_size=base.eval_batch_size,
                         num_workers=base.num_workers, augment="none", seed=seed, pin_memory=base.pin_memory)
        self.base, self.corruption, self.severity, self.corrupt_train = base, name, severity, corrupt_train
        self.num_classes, self.mean, self.std = base.num_classes, base.mean, base.std

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def corrupted_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A split of the base, corrupted (see :func:`datamodule_split`)."""
        images, targets, index = datamodule_split(self.base, split)
        return corrupt(images, self.corruption, self.severity, self.seed, index), targets, index

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        sets = {}
        for split in ("train", "val", "test"):
            if split == "train" and not self.corrupt_train:
                images, targets, index = datamodule_split(self.base, split)
            else:
                images, targets, index = self.corrupted_split(split)
            sets[split] = IndexedTensorDataset(images, targets, index)
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
        # the base's normalization as set up (e.g. DigitsDataModule computes its mean / std in setup)
        self.num_classes, self.mean, self.std = self.base.num_classes, self.base.mean, self.base.std


class CIFARCDataModule(OODImageDataModule):
    """The released CIFAR-10-C / CIFAR-100-C: ``data_dir/<release>/<corruption>.npy`` (50,000 x 32 x 32 x 3 uint8,
    severities 1..5 in blocks of 10,000) and ``labels.npy``. Train and test are the same corrupted test set.

    Args:
        data_dir: folder that holds ``CIFAR-10-C/`` or ``CIFAR-100-C/``.
        release: ``"CIFAR-10-C"`` or ``"CIFAR-100-C"``.
        corruption: file stem, e.g. ``"gaussian_noise"``.
        severity: 1..5.
        **kwargs: see :class:`OODImageDataModule`.
    """

    display_name = "CIFAR-C"
    splits = ("test",)

    def __init__(self, data_dir: str = "data", release: str = "CIFAR-10-C", corruption: str = "gaussian_noise",
                 severity: int = 3, download: bool = True, **kwargs) -> None:
        if release not in CIFAR_C_URLS:
            raise ValueError(f"release must be one of {tuple(CIFAR_C_URLS)}, got {release!r}")
        if not 1 <= severity <= 5:
            raise ValueError(f"severity must be in 1..5, got {severity}")
        super().__init__(data_dir=data_dir, download=download, image_size=32, train_split="test", test_split="test",
                         **kwargs)
        self.release, self.corruption, self.severity = release, corruption, severity
        self.num_classes = 10 if release == "CIFAR-10-C" else 100
        self.url = CIFAR_C_URLS[release]

    def _files(self) -> list[Path]:
        folder = self.data_dir / self.release
        return [folder / f"{self.corruption}.npy", folder / "labels.npy"]

    def missing(self, split: str) -> list[Path]:
        return [p for p in self._files() if not p.is_file()]

    def download_files(self) -> None:  # pragma: no cover - needs internet
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(self.url, str(self.data_dir))

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_files(split)
        images_path, labels_path = self._files()
        images, labels = np.load(images_path, mmap_mode="r"), np.load(labels_path)
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(images) != len(labels) or len(images) % 5:
            raise ValueError(f"{images_path}: expected (5 * N, 32, 32, 3) images with as many labels, got "
                             f"{images.shape} and {labels.shape}")
        n = len(images) // 5
        block = slice((self.severity - 1) * n, self.severity * n)
        x = torch.from_numpy(np.array(images[block])).permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(labels[block].astype(np.int64))
