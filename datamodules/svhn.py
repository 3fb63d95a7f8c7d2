"""SVHN (Netzer et al., "Reading Digits in Natural Images with Unsupervised Feature Learning", 2011), cropped-digits
format: ``train_32x32.mat``, ``test_32x32.mat`` and ``extra_32x32.mat`` (MATLAB files with ``X`` of shape
(32, 32, 3, N) and ``y`` of shape (N, 1), digit 0 stored as label 10). A far-OOD set of OpenOOD's CIFAR benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightning_methods.datamodules.ood_images import OODImageDataModule, resize_uint8


def read_svhn_mat(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One official ``.mat`` file -> (uint8 images (N, 3, 32, 32), int64 labels in 0..9).

    Raises:
        ValueError: the file is not a readable MATLAB file, lacks ``X``/``y`` or has the wrong shapes.
    """
    from scipy.io import loadmat

    try:
        data = loadmat(str(path))
    except Exception as err:  # scipy raises ValueError, IndexError, NotImplementedError (v7.3), ... without the path
        raise ValueError(f"{path} is not a readable SVHN .mat file ({type(err).__name__}: {err}); replace it with the "
                         "official file from http://ufldl.stanford.edu/housenumbers/ (or delete it and download "
                         "again)") from err
    if "X" not in data or "y" not in data:
        raise ValueError(f"{path} is not an SVHN cropped-digits file (needs the variables X and y)")
    x, y = np.asarray(data["X"]), np.asarray(data["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise ValueError(f"{path}: expected X of shape (32, 32, 3, N) and N labels, got {x.shape} and {len(y)}")
    labels = torch.from_numpy(y.astype(np.int64) % 10)  # the release stores digit 0 as 10
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8)), labels


class SVHNDataModule(OODImageDataModule):
    """SVHN cropped digits from ``data_dir/svhn/{train,test,extra}_32x32.mat`` (torchvision's layout).

    Args:
        data_dir: folder that holds (or receives) ``svhn/``.
        **kwargs: see :class:`OODImageDataModule` (download, image_size, train_split, test_split, ...).
    """

    num_classes = 10
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)
    display_name = "SVHN"
    splits = ("train", "test", "extra")
    url = "http://ufldl.stanford.edu/housenumbers/"

    @property
    def folder(self) -> Path:
        return self.data_dir / "svhn"

    def missing(self, split: str) -> list[Path]:
        path = self.folder / f"{split}_32x32.mat"
        return [] if path.is_file() else [path]

    def download_files(self) -> None:  # pragma: no cover - needs internet
        from torchvision.datasets import SVHN

        for split in {self.train_split, self.test_split}:
            SVHN(str(self.folder), split=split, download=True)

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_files(split)
        images, labels = read_svhn_mat(self.folder / f"{split}_32x32.mat")
        return resize_uint8(images, self.image_size), labels
