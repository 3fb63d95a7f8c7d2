"""Small data and models for the vit_locality tests: random uint8 images in an ImageDataModule, a 2-block ViT."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from lightning_methods.datamodules import ImageDataModule
from lightning_methods.vit_locality import ViTLocalityClassifier

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


class RandomImages(ImageDataModule):
    """Seeded random 32x32 uint8 images, 10 classes (``n_train`` / ``n_test``)."""

    num_classes = 10

    def __init__(self, n_train: int = 48, n_test: int = 40, data_seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("num_workers", 0)
        kwargs.setdefault("batch_size", 16)
        super().__init__(**kwargs)
        self.n_train, self.n_test, self.data_seed = n_train, n_test, data_seed

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.data_seed)
        n = self.n_train + self.n_test
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        return {"train": (x[: self.n_train], y[: self.n_train]), "test": (x[self.n_train :], y[self.n_train :])}


def tiny_classifier(seed: int = 0, **kwargs: Any) -> ViTLocalityClassifier:
    torch.manual_seed(seed)
    kwargs.setdefault("backbone_kwargs", dict(TINY))
    return ViTLocalityClassifier(num_classes=10, optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05),
                                 **kwargs)
