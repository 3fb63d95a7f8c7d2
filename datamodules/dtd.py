"""Describable Textures Dataset (Cimpoi et al., "Describing Textures in the Wild", CVPR 2014): 5640 images of 47
texture classes; "Textures", a far-OOD set of OpenOOD's CIFAR benchmarks (all 5640 images).

Official release layout (``dtd-r1.0.1.tar.gz``): ``dtd/images/<class>/<file>.jpg`` and
``dtd/labels/{train,val,test}<partition>.txt`` (lines ``<class>/<file>.jpg``); torchvision's copy nests it once more
(``dtd/dtd/...``), and both are read. Splits: ``"all"`` (every image), ``"train"``, ``"val"``, ``"test"``
(official partition ``partition``, 1..10). Labels are class positions in the sorted class list.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_methods.datamodules.ood_images import OODImageDataModule, load_images


class DTDDataModule(OODImageDataModule):
    """DTD / Textures.

    Args:
        data_dir: folder that holds (or receives) ``dtd/``.
        partition: official split partition (1..10) for ``"train"``, ``"val"``, ``"test"``.
        test_split: defaults to ``"all"`` (the OOD set).
        **kwargs: see :class:`OODImageDataModule`.
    """

    num_classes = 47
    display_name = "DTD (Textures)"
    splits = ("all", "train", "val", "test")
    url = "https://www.robots.ox.ac.uk/~vgg/data/dtd/"

    def __init__(self, data_dir: str = "data", download: bool = True, image_size: int = 32, partition: int = 1,
                 train_split: str = "train", test_split: str = "all", **kwargs) -> None:
        super().__init__(data_dir=data_dir, download=download, image_size=image_size, train_split=train_split,
                         test_split=test_split, **kwargs)
        if not 1 <= partition <= 10:
            raise ValueError(f"DTD partitions are numbered 1..10, got {partition}")
        self.partition = partition

    @property
    def folder(self) -> Path:
        nested = self.data_dir / "dtd" / "dtd"
        return nested if (nested / "images").is_dir() else self.data_dir / "dtd"

    def _classes(self) -> list[str]:
        return sorted(p.name for p in (self.folder / "images").iterdir() if p.is_dir())

    def _files(self, split: str) -> list[str]:
        if split == "all":
            return sorted(f"{c}/{p.name}" for c in self._classes() for p in (self.folder / "images" / c).glob("*.jpg"))
        lines = (self.folder / "labels" / f"{split}{self.partition}.txt").read_text().splitlines()
        return [line.strip() for line in lines if line.strip()]

    def missing(self, split: str) -> list[Path]:
        if not (self.folder / "images").is_dir():
            return [self.folder / "images"]
        if split != "all":
            labels = self.folder / "labels" / f"{split}{self.partition}.txt"
            if not labels.is_file():
                return [labels]
        return [self.folder / "images" / f for f in self._files(split) if not (self.folder / "images" / f).is_file()]

    def download_files(self) -> None:  # pragma: no cover - needs internet
        from torchvision.datasets import DTD

        DTD(str(self.data_dir), split="test", partition=self.partition, download=True)

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_files(split)
        classes = {c: i for i, c in enumerate(self._classes())}
        files = self._files(split)
        unknown = [f for f in files if f.split("/")[0] not in classes]
        if unknown:
            raise ValueError(f"{self.folder}/labels: {unknown[0]!r} names a class without an images/ folder")
        labels = torch.tensor([classes[f.split("/")[0]] for f in files], dtype=torch.int64)
        return load_images([self.folder / "images" / f for f in files], self.image_size), labels
