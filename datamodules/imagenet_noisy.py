"""The label-noise DataModules of ImageNet-scale data: ImageNet with synthetic noise and mini-WebVision with its own
web labels (Early Cutting's large-scale rows: Yuan et al., arXiv 2502.08227). Both read folder trees / list files and
can train on a subset of base indices (``set_train_subset``, the sample-selection rounds); see ``docs/imagenet.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from lightning_methods.datamodules.imagenet import ImageNetDataModule
from lightning_methods.datamodules.imagenet_files import (
    list_class_folders,
    read_class_list,
    read_file_list,
    scan_image_folder,
)
from lightning_methods.datamodules.jpeg_dataset import JpegFileDataset
from lightning_methods.datamodules.label_noise import NoiseType
from lightning_methods.datamodules.noisy_base import NoisyLabelsMixin, subset_positions


class FileSubsetMixin:
    """``set_train_subset`` for file-backed DataModules (sample-selection rounds): train on the given base
    indices only."""

    full_train_set: JpegFileDataset | None
    train_set: JpegFileDataset | None
    streaming: str | None

    def _subset_dataset(self, full: JpegFileDataset, pos: torch.Tensor) -> JpegFileDataset:
        return full.subset(pos)

    def _check_subset_support(self) -> None:
        if self.streaming:
            raise ValueError("training on a subset of samples (train_subset, sample-selection rounds) needs the "
                             "folder tree: unset data.streaming and give data.data_dir")


class NoisyImageNetDataModule(FileSubsetMixin, NoisyLabelsMixin, ImageNetDataModule):
    """ImageNet with synthetic label noise (Early Cutting's ImageNet-1k setting: 40% symmetric noise).

    Noise is generated once over the training split with the package's seeded generator
    (:func:`~lightning_methods.datamodules.make_noisy_labels`); batches carry ``"clean_target"`` (analysis only).

    Args:
        noise_type: ``none``, ``sym``, ``pairflip`` or ``asym`` (cyclic ``i -> i + 1``).
        noise_rate: nominal flip probability.
        noise_seed: seed of the noise (default: ``seed``).
        include_noise: symmetric noise only: rescale the rate by ``1 - 1/C``.
        label_file: where the generated labels are saved (reloaded and checked when it exists).
        train_subset: train only on these base indices (a list, or a .npy / .pt / .json / text file).
        val_split: fraction of the noisy training split held out as noisy validation data (0.1 as for CIFAR).
        **kwargs: see :class:`ImageNetDataModule`.
    """

    def __init__(self, noise_type: NoiseType = "sym", noise_rate: float = 0.4, noise_seed: int | None = None,
                 include_noise: bool = False, label_file: str | None = None,
                 train_subset: list[int] | str | None = None, val_split: float = 0.1, **kwargs: Any) -> None:
        if noise_type in ("instance", "cifarn"):
            raise ValueError(f"noise_type={noise_type!r} is not available for ImageNet: instance noise needs every "
                             "training image in memory, cifarn is CIFAR's; use sym, pairflip or asym")
        super().__init__(val_split=val_split, **kwargs)
        self._init_noise(noise_type=noise_type, noise_rate=noise_rate, noise_seed=noise_seed,
                         include_noise=include_noise,
                         asym_grouping=None, cifarn_file=None, cifarn_key=None, label_file=label_file,
                         train_subset=train_subset)
        if train_subset is not None:
            self._check_subset_support()
        if self.streaming:
            raise ValueError("NoisyImageNetDataModule reads the folder tree (the noise is generated over all training "
                             "labels); unset data.streaming")


class WebVisionDataModule(FileSubsetMixin, ImageNetDataModule):
    """Mini-WebVision (WebVision 1.0, Li et al., arXiv 1708.02862): the Google images of the first 50 classes with
    their own (noisy) web labels, as used by Early Cutting and the label-noise literature; tested on the WebVision
    validation images of those classes or (``eval_on="ilsvrc12"``) on the ILSVRC2012 validation images of the same
    50 classes.

    Args:
        data_dir: the WebVision root (``info/``, ``google/``, ``val_images_256/``).
        num_classes: the first classes kept (50).
        eval_on: ``webvision`` (its validation list) or ``ilsvrc12`` (``imagenet_dir/val/<wnid>/``).
        imagenet_dir: the ILSVRC2012 folder (sorted validation folders) for ``eval_on="ilsvrc12"``.
        synsets_file: the wnids of WebVision's labels in order (default: ``info/synsets.txt``; else the sorted class
            folders of ``imagenet_dir/val``).
        train_subset: train only on these base indices (sample-selection rounds).
        **kwargs: see :class:`ImageNetDataModule`.
    """

    num_classes = 50

    def __init__(self, data_dir: str = "data/webvision", num_classes: int = 50,
                 eval_on: Literal["webvision", "ilsvrc12"] = "webvision", imagenet_dir: str | None = None,
                 synsets_file: str | None = None, train_subset: list[int] | str | None = None,
                 **kwargs: Any) -> None:
        if eval_on not in ("webvision", "ilsvrc12"):
            raise ValueError(f"eval_on must be 'webvision' or 'ilsvrc12', got {eval_on!r}")
        if eval_on == "ilsvrc12" and imagenet_dir is None:
            raise ValueError("eval_on='ilsvrc12' needs imagenet_dir: the ILSVRC2012 folder with val/<wnid>/ (sort "
                             "the flat folder with `lightning-methods prepare-data sort-val`)")
        super().__init__(data_dir=data_dir, num_classes=num_classes, **kwargs)
        if self.streaming:
            raise ValueError("WebVisionDataModule reads WebVision's list files; `prepare-data convert` (streaming) "
                             "converts class-folder trees only: unset data.streaming")
        self.eval_on, self.synsets_file = eval_on, synsets_file
        self.imagenet_dir = Path(imagenet_dir).expanduser() if imagenet_dir else None
        self.train_subset = train_subset
        if train_subset is not None:
            self._check_subset_support()

    def resolve_classes(self) -> list[str]:
        return [str(c) for c in range(self.num_classes)]

    def train_files(self, classes: list[str]) -> tuple[list[str], list[int]]:
        return read_file_list(self.data_dir, self.data_dir / "info" / "train_filelist_google.txt", "",
                              self.num_classes)

    def eval_files(self, classes: list[str]) -> tuple[list[str], list[int]]:
        if self.eval_on == "webvision":
            return read_file_list(self.data_dir, self.data_dir / "info" / "val_filelist.txt", "val_images_256",
                                  self.num_classes)
        assert self.imagenet_dir is not None
        synsets = Path(self.synsets_file) if self.synsets_file else self.data_dir / "info" / "synsets.txt"
        wnids = read_class_list(synsets) if synsets.is_file() else list_class_folders(self.imagenet_dir / "val")
        return scan_image_folder(self.imagenet_dir / "val", wnids[: self.num_classes])

    def setup(self, stage: str | None = None) -> None:
        first = self.train_set is None
        super().setup(stage)
        if first and not self.streaming:
            self.full_train_set = self.train_set
            if self.train_subset is not None:
                self.set_train_subset(self.train_subset)

    def set_train_subset(self, indices: Any) -> None:
        """Train on the samples with these base indices only (``None``: all)."""
        self.train_subset = indices
        if self.full_train_set is None:
            return
        full = self.full_train_set
        if indices is None:
            self.train_set = full
            return
        self.train_set = full.subset(subset_positions(full.indices, indices))
