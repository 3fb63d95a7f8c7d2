"""Un-augmented passes over the training set for coreset scoring and BatchNorm recalibration.

Both read the DataModule's ``train_set`` (the package's ``ImageDataModule`` and subclasses) in evaluation form: no
per-sample worker transform, no random crop / flip, only the DataModule's normalization (``mean`` / ``std``) for
uint8 images. Scoring shards the set over DDP ranks (``sharded_loader``) and tags every sample with its position, so
scores can be gathered by position (``gather_by_index``) without the padding duplicates of ``DistributedSampler``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_methods.datamodules import collate_dict
from lightning_methods.datamodules.transforms import model_input
from lightning_methods.utils import sharded_loader


def train_dataset(trainer: Trainer, what: str) -> Dataset:
    """The DataModule's training set without per-sample transforms.

    Raises:
        RuntimeError: if the Trainer has no DataModule with a ``train_set`` (``what`` names the feature that needs it).
    """
    dm = trainer.datamodule
    ds = getattr(dm, "train_set", None) if dm is not None else None
    if ds is None:
        raise RuntimeError(f"{what} needs a DataModule with a `train_set` (lightning_methods.datamodules."
                           "ImageDataModule and its subclasses, after setup); got "
                           f"{type(dm).__name__ if dm is not None else 'no DataModule'}")
    if getattr(ds, "transform", None) is not None:
        ds = copy.copy(ds)
        ds.transform = None  # scoring and calibration see the images without augmentation
    return ds


def plain_images(image: torch.Tensor, trainer: Trainer, device: torch.device) -> torch.Tensor:
    """A batch of images as model input on ``device``, without augmentation (``model_input``)."""
    return model_input(image, trainer.datamodule, device)


class PositionDataset(Dataset):
    """Items of ``dataset`` plus ``"position"`` (their position in ``dataset``), batched through ``__getitems__``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "position": torch.tensor(i)}

    def __getitems__(self, idx: list[int]) -> Any:
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is None:
            return [self[i] for i in idx]
        batch = getitems(idx)
        if isinstance(batch, dict):
            return {**batch, "position": torch.as_tensor(idx)}
        return [{**item, "position": torch.tensor(i)} for item, i in zip(batch, idx)]


def scoring_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """Unshuffled, rank-sharded loader whose batches carry ``"position"`` (combine with ``gather_by_index``)."""
    return sharded_loader(PositionDataset(dataset), batch_size, collate_fn=collate_dict)


def calibration_batches(trainer: Trainer, n_batches: int, batch_size: int, device: torch.device,
                        seed: int = 0) -> Iterator[torch.Tensor]:
    """``n_batches`` batches of normalized training images from a seeded random subset (the same on every rank)."""
    ds = train_dataset(trainer, "BatchNorm recalibration (model.bn_recalibration; 'none' skips it)")
    n = len(ds)  # type: ignore[arg-type]
    pos = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n_batches * batch_size]
    loader = DataLoader(Subset(ds, pos.tolist()), batch_size=batch_size, shuffle=False, collate_fn=collate_dict)
    for batch in loader:
        yield plain_images(batch["image"], trainer, device)
