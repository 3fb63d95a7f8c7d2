"""CINIC-10 (Darlow et al., *CINIC-10 is not ImageNet or CIFAR-10*, arXiv 1810.03505): 270,000 32x32 images of the
CIFAR-10 classes (CIFAR-10 images plus downsampled ImageNet images), split equally into train / valid / test
(90,000 each). The Tunnel Effect (Masarczyk et al., arXiv 2305.19753) uses it for the dataset-size comparison.

Official on-disk layout (the extracted ``CINIC-10.tar.gz``)::

    <data_dir>/CINIC-10/{train,valid,test}/<class>/*.png    class in airplane automobile bird cat deer dog frog
                                                            horse ship truck (labels 0..9 in this order, as CIFAR-10)

``prepare_data`` downloads and extracts the archive when ``download=True`` and the folder is missing. Reading
270k PNG files takes minutes, so the first ``setup`` stores each split as a uint8 tensor file
``<data_dir>/CINIC-10/.cache/<split>_uint8.pt`` (written atomically, keyed by the number of files; loaded with
``weights_only=True``). ``train_splits=("train", "valid")`` trains on 180k images, as the CINIC-10 authors suggest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_methods.datamodules.base import DATA_DIR_HINT, ImageDataModule
from lightning_methods.utils import atomic_torch_save, safe_torch_load

CINIC10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CINIC10_URL = "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"
SPLITS = ("train", "valid", "test")


def read_cinic_split(split_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of one split folder (``<split>/<class>/*.png``) as uint8 N x 3 x 32 x 32 and int64 labels,
    classes in CIFAR-10 order, files in sorted order.

    Raises:
        FileNotFoundError: a class folder is missing. ValueError: an image is not 32x32 or a folder is not a class.
    """
    from PIL import Image

    split_dir = Path(split_dir)
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    unknown = [c for c in present if c not in CINIC10_CLASSES]
    missing = [c for c in CINIC10_CLASSES if c not in present]
    if unknown or missing:
        raise FileNotFoundError(f"{split_dir} must hold one folder per CINIC-10 class ({', '.join(CINIC10_CLASSES)});"
                                f" missing {missing}, unknown {unknown}")
    images, labels = [], []
    for label, cls in enumerate(CINIC10_CLASSES):
        for f in sorted((split_dir / cls).glob("*.png")):
            with Image.open(f) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
            if arr.shape != (32, 32, 3):
                raise ValueError(f"{f} is {arr.shape[1]}x{arr.shape[0]}, CINIC-10 images are 32x32")
            images.append(arr)
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"{split_dir} holds no .png images")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long)


class CINIC10DataModule(ImageDataModule):
    """CINIC-10 with the package's batches and on-device augmentation.

    Args:
        data_dir: directory that holds (or receives) the extracted ``CINIC-10/`` folder.
        download: download and extract the archive (about 690 MB) when the folder is missing.
        train_splits: official splits used for training (``("train",)`` = 90k images, ``("train", "valid")`` =
            180k); the test split is always ``test``.
        cache: store each split as a uint8 tensor file after the first read.
        **kwargs: see :class:`ImageDataModule` (batch_size, num_workers, val_split, augment, gpu_resident, ...).
    """

    num_classes = 10
    mean = (0.47889522, 0.47227842, 0.43047404)  # CINIC-10 README (train split)
    std = (0.24205776, 0.23828046, 0.25874835)
    folder = "CINIC-10"

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        train_splits: Sequence[str] = ("train",),
        cache: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        bad = [s for s in train_splits if s not in ("train", "valid")]
        if bad or not train_splits:
            raise ValueError(f"train_splits must be a non-empty subset of ('train', 'valid'), got {list(train_splits)}")
        self.data_dir = Path(data_dir).expanduser()
        self.download, self.train_splits, self.cache = download, tuple(train_splits), cache

    @property
    def release_dir(self) -> Path:
        return self.data_dir / self.folder

    def _missing(self) -> list[str]:
        return [s for s in (*self.train_splits, "test") if not (self.release_dir / s).is_dir()]

    def _not_found(self, reason: str) -> str:
        return (f"CINIC-10 is not available: {reason}. Expected the extracted folder {self.release_dir}/ with "
                f"train/, valid/ and test/ (one folder per class with 32x32 PNG files). Either extract CINIC-10.tar.gz "
                f"from {CINIC10_URL} into {self.release_dir}/ (or point this DataModule's data_dir at the folder "
                f"that holds it: {DATA_DIR_HINT}), or run once with download true (--data.download true) on a machine "
                "with internet access.")

    def prepare_data(self) -> None:
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise FileNotFoundError(self._not_found(f"missing the split folders {missing} and download=False"))
        try:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(CINIC10_URL, str(self.data_dir), extract_root=str(self.release_dir))
            nested = self.release_dir / self.folder  # an archive with a top-level CINIC-10/ folder
            if nested.is_dir() and not (self.release_dir / "train").exists():
                for child in nested.iterdir():
                    child.rename(self.release_dir / child.name)
        except Exception as err:  # URLError, socket errors, bad archives: all mean "no data"
            raise RuntimeError(self._not_found(f"the download failed ({type(err).__name__}: {err})")) from err

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        split_dir = self.release_dir / split
        n_files = sum(1 for _ in split_dir.glob("*/*.png"))
        cache = self.release_dir / ".cache" / f"{split}_uint8.pt"
        if self.cache and cache.is_file():
            stored = safe_torch_load(cache, what="CINIC-10 cache")
            if stored.get("n_files") == n_files:
                return stored["images"], stored["labels"]
        images, labels = read_cinic_split(split_dir)
        if self.cache:
            atomic_torch_save({"images": images, "labels": labels, "n_files": n_files}, cache)
        return images, labels

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        missing = self._missing()
        if missing:
            raise FileNotFoundError(self._not_found(f"missing the split folders {missing}"))
        parts = [self._split(s) for s in self.train_splits]
        train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return {"train": train, "test": self._split("test")}
