"""CIFAR-10 / CIFAR-100 DataModules (Krizhevsky, 2009) reading the official python pickle release.

``prepare_data`` downloads and verifies the archive with torchvision when ``download=True`` and the extracted folder
is missing; ``setup`` reads the pickle files themselves (so any copy in the official on-disk format works, including
one placed by hand on an offline machine).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ImageDataModule


def read_cifar_batch(path: str | Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle file of the python release -> (uint8 images N x 3 x 32 x 32, int64 labels)."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(entry[label_key], dtype=np.int64)


class CIFARDataModule(ImageDataModule):
    """Shared CIFAR logic; use :class:`CIFAR10DataModule` or :class:`CIFAR100DataModule`.

    Args:
        data_dir: directory that holds (or receives) the extracted release folder.
        download: download with torchvision when the folder is missing (needs internet).
        **kwargs: see :class:`ImageDataModule` (batch_size, num_workers, val_split, augment, gpu_resident, ...).
    """

    folder = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    label_key = ""
    display_name = ""
    url = ""

    def __init__(self, data_dir: str = "data", download: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir).expanduser()
        self.download = download

    @property
    def release_dir(self) -> Path:
        return self.data_dir / self.folder

    def _missing_files(self) -> list[str]:
        return [f for f in (*self.train_files, *self.test_files) if not (self.release_dir / f).is_file()]

    def _not_found_message(self, reason: str) -> str:
        return (
            f"{self.display_name} is not available: {reason}. Expected the extracted folder "
            f"{self.release_dir}/ with the files {', '.join(self.train_files + self.test_files)}. Either put the "
            f"'{self.folder}/' folder from {self.url} into {self.data_dir}/ (set --data.data_dir to its parent "
            "directory), or run once with --data.download true on a machine with internet access."
        )

    def _torchvision_dataset(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def prepare_data(self) -> None:
        missing = self._missing_files()
        if not missing:
            return
        if not self.download:
            raise FileNotFoundError(self._not_found_message(f"missing {', '.join(missing)} and download=False"))
        try:
            self._torchvision_dataset()(str(self.data_dir), train=True, download=True)
        except Exception as err:  # URLError, socket errors, checksum failures: all mean "no data"
            raise RuntimeError(self._not_found_message(f"the download failed ({type(err).__name__}: {err})")) from err

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        missing = self._missing_files()
        if missing:
            raise FileNotFoundError(self._not_found_message(f"missing {', '.join(missing)}"))
        out = {}
        for split, files in (("train", self.train_files), ("test", self.test_files)):
            parts = [read_cifar_batch(self.release_dir / f, self.label_key) for f in files]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"{self.release_dir}: labels outside [0, {self.num_classes}) - wrong dataset folder?")
            out[split] = (torch.from_numpy(images), torch.from_numpy(labels))
        return out


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 50k train / 10k test 32x32 images, 10 classes (folder ``cifar-10-batches-py``)."""

    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"
    display_name = "CIFAR-10"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

    def _torchvision_dataset(self):
        from torchvision.datasets import CIFAR10

        return CIFAR10


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 50k train / 10k test 32x32 images, 100 fine classes (folder ``cifar-100-python``)."""

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    display_name = "CIFAR-100"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"

    def _torchvision_dataset(self):
        from torchvision.datasets import CIFAR100

        return CIFAR100
