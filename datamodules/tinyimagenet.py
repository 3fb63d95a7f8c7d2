"""Tiny-ImageNet (Stanford CS231n): 200 classes of 64x64 images, 100,000 training and 10,000 validation images.

Reads the official release folder ``tiny-imagenet-200/`` as it comes out of ``tiny-imagenet-200.zip``:

    tiny-imagenet-200/wnids.txt                      one WordNet id per line (200 classes)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 training images per class
    tiny-imagenet-200/val/images/*.JPEG              10,000 validation images
    tiny-imagenet-200/val/val_annotations.txt        "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" per image

Class ``c`` is the position of its wnid in the *sorted* wnid list (the order of torchvision's ``ImageFolder`` over
``train/``). The official test split has no labels: the DataModule tests on the validation split, as is customary.
Decoding 110k JPEGs takes about a minute; with ``cache=True`` the decoded uint8 arrays are stored next to the release
(``lightning_methods_<split>.pt``, written atomically, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_methods.datamodules.base import ImageDataModule

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"


def tinyimagenet_dir(root: str | Path) -> Path:
    """The release folder: ``root/tiny-imagenet-200`` or ``root`` itself when it holds ``wnids.txt``."""
    root = Path(root).expanduser()
    if not (root / FOLDER).is_dir() and (root / "wnids.txt").is_file():
        return root
    return root / FOLDER


def _missing_message(folder: Path, reason: str) -> str:
    return (f"Tiny-ImageNet is not available: {reason}. Expected the official folder {folder}/ with wnids.txt, "
            "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt. Unzip "
            f"{TINYIMAGENET_URL} into {folder.parent}/ (set data_dir to the folder that holds '{FOLDER}/'), or run "
            "once with download=True on a machine with internet access.")


def download_tinyimagenet(root: str | Path) -> Path:
    """Download and extract the official zip into ``root`` (md5-checked); returns the release folder.

    Raises:
        RuntimeError: if the download or the extraction fails (e.g. offline), with what to do instead.
    """
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(root).expanduser()
    try:
        download_and_extract_archive(TINYIMAGENET_URL, str(root), md5=TINYIMAGENET_MD5)
    except Exception as err:  # URLError, socket errors, checksum failures: all mean "no data"
        raise RuntimeError(_missing_message(root / FOLDER, f"the download failed ({type(err).__name__}: {err})")
                           ) from err
    return root / FOLDER


def _read_wnids(folder: Path) -> list[str]:
    path = folder / "wnids.txt"
    if not path.is_file():
        raise FileNotFoundError(_missing_message(folder, f"{path} does not exist"))
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f"{path} must list distinct WordNet ids, one per line; got {len(wnids)} lines")
    return sorted(wnids)


def _split_files(folder: Path, split: str, wnids: list[str]) -> tuple[list[Path], list[int]]:
    label = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        files, labels = [], []
        for wnid in wnids:
            images = folder / "train" / wnid / "images"
            found = sorted(images.glob("*.JPEG")) if images.is_dir() else []
            if not found:
                raise FileNotFoundError(_missing_message(folder, f"no training images in {images}"))
            files += found
            labels += [label[wnid]] * len(found)
        return files, labels
    ann = folder / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(_missing_message(folder, f"{ann} does not exist"))
    files, labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label:
            raise ValueError(f"{ann}, line {n}: expected '<file>\\t<wnid>\\t...' with a wnid from wnids.txt, "
                             f"got {line!r}")
        files.append(folder / "val" / "images" / parts[0])
        labels.append(label[parts[1]])
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(_missing_message(folder, f"{len(missing)} validation images listed in {ann} are "
                                                         f"missing, e.g. {missing[0]}"))
    return files, labels


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.shape != (64, 64, 3):
        raise ValueError(f"{path}: Tiny-ImageNet images are 64x64, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def load_tinyimagenet_split(root: str | Path, split: str, download: bool = False, cache: bool = False,
                            threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One labelled split of the official release as ``(uint8 images (N, 3, 64, 64), int64 labels (N,))``.

    Args:
        root: the folder that holds ``tiny-imagenet-200/`` (or that folder itself).
        split: ``"train"`` (100,000 images, class by class) or ``"val"`` (10,000 images, annotation-file order).
        download: download and extract the official zip into ``root`` when the folder is missing.
        cache: store the decoded arrays as ``lightning_methods_<split>.pt`` in the release folder and reuse them
            while the split's file count and class list are unchanged.
        threads: JPEG decoding threads (default: up to 8).

    Raises:
        ValueError: unknown split (the official test split has no labels), malformed files.
        FileNotFoundError: the release folder or parts of it are missing (and ``download`` is False).
        RuntimeError: the download failed.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r} (the official test split has no labels; "
                         "use 'val' as the test set)")
    folder = tinyimagenet_dir(root)
    if not folder.is_dir():
        if not download:
            raise FileNotFoundError(_missing_message(folder, f"{folder} does not exist and download=False"))
        folder = download_tinyimagenet(Path(root).expanduser())
    wnids = _read_wnids(folder)
    files, labels = _split_files(folder, split, wnids)
    cache_path = folder / f"lightning_methods_{split}.pt"
    key = {"n_files": len(files), "wnids": wnids}
    if cache and cache_path.is_file():
        from lightning_methods.utils import safe_torch_load

        stored = safe_torch_load(cache_path, what="Tiny-ImageNet cache")
        if stored.get("key") == key:
            return stored["images"], stored["labels"]
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(_decode, files))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor(labels, dtype=torch.int64)
    if cache:
        from lightning_methods.utils import atomic_torch_save

        try:
            atomic_torch_save({"key": key, "images": images, "labels": targets}, cache_path)
        except OSError:  # a read-only dataset folder: decode again next time
            pass
    return images, targets


class TinyImageNetDataModule(ImageDataModule):
    """Tiny-ImageNet at 64x64: trains on the official training split and tests on the official validation split.

    Augmentation as for CIFAR (``augment``: pad-4 random crop + flip on the device; ``"autoaugment"`` /
    ``"colorjitter"`` per sample in workers first), CutMix/MixUp on the device.

    Args:
        data_dir: the folder that holds (or receives) ``tiny-imagenet-200/``.
        download: download the official zip when the folder is missing (needs internet).
        cache: cache the decoded uint8 arrays in the release folder (see :func:`load_tinyimagenet_split`).
        **kwargs: see :class:`ImageDataModule` (batch_size, num_workers, val_split, augment, cutmix_alpha, ...).
    """

    num_classes = 200
    mean = (0.4802, 0.4481, 0.3975)
    std = (0.2302, 0.2265, 0.2262)

    def __init__(self, data_dir: str = "data", download: bool = True, cache: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir).expanduser()
        self.download, self.cache = download, cache

    def prepare_data(self) -> None:
        folder = tinyimagenet_dir(self.data_dir)
        if folder.is_dir():
            return
        if not self.download:
            raise FileNotFoundError(_missing_message(folder, f"{folder} does not exist and download=False"))
        download_tinyimagenet(self.data_dir)

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"train": load_tinyimagenet_split(self.data_dir, "train", cache=self.cache),
                "test": load_tinyimagenet_split(self.data_dir, "val", cache=self.cache)}
