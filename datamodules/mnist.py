"""MNIST (LeCun et al., 1998) from the official IDX files, as grey 28x28 digits resized to ``image_size`` and repeated
to 3 channels (OpenOOD's far-OOD MNIST for the CIFAR benchmarks resizes to 32).

Files: ``data_dir/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (torchvision's layout), plain or ``.gz``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from lightning_methods.datamodules.ood_images import OODImageDataModule, resize_uint8

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (``.gz`` or plain): magic ``0 0 <type> <ndim>``, big-endian int32 sizes, then the data.

    Raises:
        ValueError: a bad magic number, an unknown type code or a truncated file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError) as err:
        raise ValueError(f"{path} is not an IDX file (a damaged .gz: {err}); re-download it") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    count = int(np.prod(shape))
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: expected {count} values of shape {shape}")
    return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(shape)


class MNISTDataModule(OODImageDataModule):
    """MNIST digits as uint8 RGB images of side ``image_size``.

    Args:
        data_dir: folder that holds (or receives) ``MNIST/raw/``.
        **kwargs: see :class:`OODImageDataModule`.
    """

    num_classes = 10
    mean = (0.1307, 0.1307, 0.1307)
    std = (0.3081, 0.3081, 0.3081)
    display_name = "MNIST"
    url = "https://yann.lecun.com/exdb/mnist/"
    prefixes = {"train": "train", "test": "t10k"}

    def _file(self, split: str, kind: str) -> Path:
        name = f"{self.prefixes[split]}-{kind}-ubyte"
        raw = self.data_dir / "MNIST" / "raw"
        return raw / name if (raw / name).is_file() or not (raw / f"{name}.gz").is_file() else raw / f"{name}.gz"

    def missing(self, split: str) -> list[Path]:
        return [p for p in (self._file(split, "images-idx3"), self._file(split, "labels-idx1")) if not p.is_file()]

    def download_files(self) -> None:  # pragma: no cover - needs internet
        from torchvision.datasets import MNIST

        MNIST(str(self.data_dir), train=True, download=True)

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_files(split)
        images = read_idx(self._file(split, "images-idx3"))
        labels = read_idx(self._file(split, "labels-idx1"))
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
        x = torch.from_numpy(images.copy()).unsqueeze(1)
        return resize_uint8(x, self.image_size), torch.from_numpy(labels.astype(np.int64))
