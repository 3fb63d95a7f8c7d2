"""CIFAR-10 / CIFAR-100 DataModules (Krizhevsky, 2009) reading the official python pickle release.

``prepare_data`` downloads and verifies the archive with torchvision when ``download=True`` and the extracted folder
is missing; ``setup`` reads the pickle files themselves (so any copy in the official on-disk format works, including
one placed by hand on an offline machine). Every file is validated (rows of 3x32x32 bytes, one integer label per
image, labels in range) and read by an unpickler that accepts only numpy arrays, so a damaged file stops with an error
that names it and a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_methods.datamodules.base import DATA_DIR_HINT, ImageDataModule

#: The only globals a CIFAR pickle references (numpy arrays and, for files written by Python 3 with protocol 2,
#: byte strings); anything else is refused, so a crafted file cannot run code while it loads.
_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})
_ROW = 3 * 32 * 32


class _CIFARUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR pickle never holds (a crafted "
                                         "pickle can run code while it loads; refused)")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _CIFARUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        reason = "truncated" if isinstance(err, EOFError) or "truncated" in str(err) else "not a CIFAR pickle"
        raise ValueError(f"CIFAR file {path} is {reason} ({type(err).__name__}: {err}); replace it with the file from "
                         "the official release (delete the folder and download again)") from err


def read_cifar_batch(path: str | Path, label_key: str, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One pickle file of the python release -> (uint8 images N x 3 x 32 x 32, int64 labels).

    The file is validated: a dict with ``data`` (N rows of 3072 bytes, or N x 3 x 32 x 32) and ``label_key`` (N
    integers, in ``[0, num_classes)`` when given). Every error names the file.

    Raises:
        ValueError: the file is truncated, is not a CIFAR pickle, references objects other than numpy arrays, or its
            images / labels have the wrong shape, count, type or range.
    """
    path = Path(path)
    entry = _load_cifar_pickle(path)
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"CIFAR file {path} holds {keys}, expected a dict with 'data' and {label_key!r} (wrong file, "
                         "or CIFAR-10 and CIFAR-100 mixed up?)")
    data = np.asarray(entry["data"])
    if data.ndim == 4 and data.shape[1:] == (3, 32, 32):
        data = data.reshape(len(data), _ROW)
    if data.ndim != 2 or data.shape[1] != _ROW:
        raise ValueError(f"CIFAR file {path}: 'data' has shape {data.shape}, expected (N, {_ROW}) rows of 3x32x32 "
                         "bytes; the file is damaged or not from the CIFAR python release")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
            raise ValueError(f"CIFAR file {path}: 'data' has dtype {data.dtype}, expected uint8 pixel values")
        data = data.astype(np.uint8)
    labels = np.asarray(entry[label_key])
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ValueError(f"CIFAR file {path}: {label_key!r} must be a list of integers, got an array of shape "
                         f"{labels.shape} and dtype {labels.dtype}")
    if len(labels) != len(data):
        raise ValueError(f"CIFAR file {path}: {len(data)} images but {len(labels)} labels in {label_key!r}; the file "
                         "is damaged, replace it with the file from the official release")
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"CIFAR file {path}: labels in {label_key!r} span [{labels.min()}, {labels.max()}], outside "
                         f"[0, {num_classes}) - wrong dataset folder?")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


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
            f"'{self.folder}/' folder from {self.url} into {self.data_dir}/ (or point this DataModule's data_dir at "
            f"the folder that holds it: {DATA_DIR_HINT}), or run once with download true (--data.download true) on a "
            "machine with internet access."
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
            parts = [read_cifar_batch(self.release_dir / f, self.label_key, self.num_classes) for f in files]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            if len(labels) == 0:
                raise ValueError(f"{self.display_name} {split} files {', '.join(files)} in {self.release_dir} hold no "
                                 "images; replace them with the files from the official release")
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
