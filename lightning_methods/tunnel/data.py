"""The data a tunnel probe reads: train/test splits of a DataModule, seeded sample subsets and the OOD class subset.

The OOD probe of Masarczyk et al. (*The Tunnel Effect*, NeurIPS 2023, arXiv 2305.19753) fits probes on a 10-class
subset of another dataset (CIFAR-10 model -> 10 CIFAR-100 classes, and the reverse: CIFAR-100 model -> CIFAR-10).
The classes are drawn with a seed (sorted) or given explicitly, and relabelled ``0 .. k-1`` in that order. OOD images
are normalized with the *in-distribution* mean and std: the probed network's input pipeline is the one it was
trained with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

from lightning_methods.datamodules import IndexedTensorDataset
from lightning_methods.datamodules.transforms import model_input
from lightning_methods.utils import mix_seed


@dataclass
class ProbeData:
    """Train and test datasets (dict items ``{"image", "target", "index"}``) of one probed distribution."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    classes: list[int] | None = None  # source class ids of an OOD subset, in label order


class _DictView(Dataset):
    """Positions ``pos`` of any map-style dataset as dict items, labels mapped through ``label_map``."""

    def __init__(self, dataset: Dataset, pos: torch.Tensor, label_map: dict[int, int] | None = None) -> None:
        self.dataset, self.pos, self.label_map = dataset, pos.tolist(), label_map

    def __len__(self) -> int:
        return len(self.pos)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[self.pos[i]]
        if isinstance(item, Mapping):
            image, target = item["image"], item["target"]
        else:
            image, target = item[0], item[1]
        target = int(target)
        if self.label_map is not None:
            target = self.label_map[target]
        return {"image": image, "target": torch.tensor(target), "index": torch.tensor(self.pos[i])}


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """Labels of a dataset: ``.targets`` when present (package and torchvision datasets), else read item by item."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).long()
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        out.append(int(item["target"] if isinstance(item, Mapping) else item[1]))
    return torch.tensor(out, dtype=torch.long)


def subset(dataset: Dataset, pos: torch.Tensor, label_map: dict[int, int] | None = None) -> Dataset:
    """The samples at positions ``pos`` as a dict dataset whose ``"index"`` is the position in ``dataset``.

    The probe reads images without augmentation: the per-sample ``transform`` of a package dataset (the worker
    AutoAugment / ColorJitter of ``augment="autoaugment" | "colorjitter"``) is not applied.
    """
    pos = pos.long()
    if isinstance(dataset, IndexedTensorDataset):
        targets = dataset.targets[pos]
        if label_map is not None:
            lut = torch.full((int(dataset.targets.max()) + 1,), -1, dtype=torch.long)
            for src, dst in label_map.items():
                lut[src] = dst
            targets = lut[targets]
        return IndexedTensorDataset(dataset.images[pos], targets, pos)
    return _DictView(dataset, pos, label_map)


def select_classes(num_available: int, classes: int | Sequence[int] | None, seed: int = 0,
                   dataset: str = "the OOD dataset") -> list[int]:
    """Class ids of an OOD subset: all classes (None), ``k`` classes drawn with ``seed`` (sorted), or a given list.

    Raises:
        ValueError: ``k`` larger than the classes available (or < 1), ids out of range or repeated.
    """
    if classes is None:
        return list(range(num_available))
    if isinstance(classes, int):
        if not 1 <= classes <= num_available:
            raise ValueError(
                f"ood_classes={classes} asks for more classes than {dataset} has ({num_available}); use at most "
                f"{num_available} (e.g. 10 CIFAR-100 classes for a CIFAR-10 model, or all 10 CIFAR-10 classes for a "
                "CIFAR-100 model) or give the class ids as a list"
            )
        g = torch.Generator().manual_seed(mix_seed(seed, num_available, classes))
        return sorted(torch.randperm(num_available, generator=g)[:classes].tolist())
    ids = [int(c) for c in classes]
    bad = [c for c in ids if not 0 <= c < num_available]
    if bad or len(set(ids)) != len(ids) or not ids:
        raise ValueError(f"ood_classes={ids}: class ids must be distinct and lie in [0, {num_available}) for {dataset}"
                         f"{f' (out of range: {bad})' if bad else ''}")
    return ids


def datamodule_data(dm: LightningDataModule, name: str | None = None) -> ProbeData:
    """The train and test sets of a package DataModule (``setup`` is called when needed).

    Raises:
        TypeError: the DataModule has no ``train_set`` / ``test_set`` after ``setup``.
    """
    if getattr(dm, "train_set", None) is None or getattr(dm, "test_set", None) is None:
        dm.setup("fit")
    train, test = getattr(dm, "train_set", None), getattr(dm, "test_set", None)
    if train is None or test is None:
        raise TypeError(f"{type(dm).__name__} has no train_set / test_set after setup(); the tunnel probe reads the "
                        "datasets of the package's DataModules (lightning_methods.datamodules)")
    num_classes = int(getattr(dm, "num_classes", 0)) or int(dataset_targets(train).max()) + 1
    return ProbeData(name or type(dm).__name__.replace("DataModule", ""), train, test, num_classes)


def class_subset(data: ProbeData, classes: int | Sequence[int] | None, seed: int = 0) -> ProbeData:
    """``data`` restricted to a class subset (see :func:`select_classes`), labels ``0 .. k-1``."""
    ids = select_classes(data.num_classes, classes, seed, data.name)
    if ids == list(range(data.num_classes)):
        return ProbeData(data.name, data.train, data.test, data.num_classes, ids)
    label_map = {c: i for i, c in enumerate(ids)}
    keep = torch.tensor(ids)

    def part(ds: Dataset) -> Dataset:
        pos = torch.isin(dataset_targets(ds), keep).nonzero().flatten()
        return subset(ds, pos, label_map)

    return ProbeData(f"{data.name}[{len(ids)} classes]", part(data.train), part(data.test), len(ids), ids)


def image_preparer(datamodule: Any, device: torch.device):
    """batch -> model input on ``device`` (``model_input``: the DataModule's normalization, no augmentation)."""

    def prepare(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model_input(batch["image"], datamodule, device)

    return prepare
