"""Shared machinery of the OOD image sets (SVHN, MNIST, DTD, Places365, CelebA): named splits read from the official
on-disk formats, JPEG decoding to fixed-size uint8 arrays, downloads with torchvision when online and a clear message
when the files are missing.

Images of other sizes are resized so that the shorter side is ``image_size`` (bilinear, antialiased by PIL) and
centre-cropped, as OpenOOD's test preprocessing does for its CIFAR benchmarks (``Resize(32)`` + ``CenterCrop(32)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lightning_methods.datamodules.base import ImageDataModule


def load_image(path: str | Path, size: int) -> np.ndarray:
    """One image file -> uint8 (size, size, 3): shorter side resized to ``size``, centre crop."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def load_images(paths: Sequence[str | Path], size: int, threads: int | None = None) -> torch.Tensor:
    """Decode image files in threads -> uint8 tensor (N, 3, size, size)."""
    if not paths:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(lambda p: load_image(p, size), paths))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of uint8 NCHW images (grey images are repeated to 3 channels)."""
    import torch.nn.functional as F

    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


def read_image_list(path: str | Path) -> list[tuple[str, int]]:
    """An OpenOOD benchmark image list: one ``<relative path> <label>`` per line (label optional, -1 for OOD).

    Raises:
        FileNotFoundError: the list does not exist.
        ValueError: a line without a path or with a label that is not an integer.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist (OpenOOD lists live in benchmark_imglist/)")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        label = parts[1].split()[0] if len(parts) > 1 and parts[1].strip() else "-1"
        try:
            entries.append((parts[0], int(label)))
        except ValueError as err:
            raise ValueError(f"{path}, line {n}: expected '<relative path> <integer label>', got {line!r}") from err
    return entries


class OODImageDataModule(ImageDataModule):
    """Base of the OOD image sets: subclasses implement :meth:`load_split` and :meth:`download_files`.

    Args:
        data_dir: directory that holds (or receives) the dataset folder.
        download: download with torchvision when the files are missing (needs internet).
        image_size: side of the square uint8 images (32 for the CIFAR benchmarks).
        train_split: split used as the training set.
        test_split: split used as the test set (the usual OOD set).
        **kwargs: see :class:`ImageDataModule` (batch_size, num_workers, ...); ``augment`` defaults to ``"none"``.
    """

    display_name = ""
    splits: tuple[str, ...] = ("train", "test")
    url = ""

    def __init__(self, data_dir: str = "data", download: bool = True, image_size: int = 32,
                 train_split: str = "train", test_split: str = "test", batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 pin_memory: bool | None = None) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         augment="none", seed=seed, pin_memory=pin_memory)  # OOD sets are embedded, never trained on
        for split in (train_split, test_split):
            self._check_split(split)
        self.data_dir = Path(data_dir).expanduser()
        self.download, self.image_size = download, image_size
        self.train_split, self.test_split = train_split, test_split

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"{self.display_name} has the splits {self.splits}, got {split!r}")

    def missing(self, split: str) -> list[Path]:
        """Files of ``split`` that are not on disk (empty when the split can be read)."""
        raise NotImplementedError

    def download_files(self) -> None:  # pragma: no cover - needs internet
        raise NotImplementedError

    def not_found(self, reason: str) -> str:
        return (f"{self.display_name} is not available: {reason}. Put the official release under {self.data_dir}/ "
                f"(see {self.url}; set data_dir to the folder that holds it), or run once with download=True on a "
                "machine with internet access.")

    def prepare_data(self) -> None:
        self.prepare_splits((self.train_split, self.test_split))

    def prepare_splits(self, splits: Sequence[str]) -> None:
        """Download (when allowed) what the named splits need; raise a clear error when files are missing."""
        missing = sorted({p for s in splits for p in self.missing(s)})
        if not missing:
            return
        if not self.download:
            raise FileNotFoundError(self.not_found(f"missing {missing[0]} and download=False"))
        try:
            self.download_files()
        except Exception as err:  # URLError, socket errors, checksum failures: all mean "no data"
            raise RuntimeError(self.not_found(f"the download failed ({type(err).__name__}: {err})")) from err

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 images (N, 3, image_size, image_size), int64 labels (N,))`` of a named split.

        Raises:
            ValueError: unknown split.
            FileNotFoundError: files of the split are missing.
        """
        raise NotImplementedError

    def _require_files(self, split: str) -> None:
        """Stop unless ``split`` is one of this data set's splits and its files are all there."""
        self._check_split(split)
        missing = self.missing(split)
        if missing:
            raise FileNotFoundError(self.not_found(f"missing {missing[0]}"))

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"train": self.load_split(self.train_split), "test": self.load_split(self.test_split)}
