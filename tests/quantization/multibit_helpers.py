"""Shared pieces of the multi-bit tests: a tiny image DataModule, a tiny MultiBitClassifier, and the deterministic
parameter fill / inputs used to compare with golden values of the official Any-Precision code."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from lightning_methods.datamodules import ImageDataModule
from lightning_methods.quantization import MultiBitClassifier

BITS = [1, 2, 4, 8, 32]


class TinyImages(ImageDataModule):
    """Random uint8 images (3 x size x size) with learnable labels: the class sets the mean brightness of a channel."""

    num_classes = 4

    def __init__(self, n_train: int = 48, n_test: int = 16, size: int = 8, **kwargs: Any) -> None:
        kwargs.setdefault("num_workers", 0)
        kwargs.setdefault("batch_size", 8)
        kwargs.setdefault("augment", "none")
        super().__init__(**kwargs)
        self.n_train, self.n_test, self.size = n_train, n_test, size

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(123)
        n = self.n_train + self.n_test
        y = torch.arange(n) % self.num_classes
        x = torch.randint(0, 100, (n, 3, self.size, self.size), generator=g)
        x[torch.arange(n), y % 3] += 60 * (1 + y[:, None, None] // 3)
        x = x.clamp(0, 255).to(torch.uint8)
        return {"train": (x[: self.n_train], y[: self.n_train]), "test": (x[self.n_train :], y[self.n_train :])}


def tiny_model(**kwargs: Any) -> MultiBitClassifier:
    """A 4/8/16-channel pre-activation ResNet-8 as MultiBitClassifier (Adam 1e-2)."""
    args: dict[str, Any] = dict(backbone="preact_resnet8", num_classes=4, backbone_kwargs={"width": 0.25},
                                optimizer=partial(torch.optim.Adam, lr=1e-2), eval_bits=[1, 3, 32],
                                recalib_batches=2)
    args.update(kwargs)
    return MultiBitClassifier(**args)


def fill(model: torch.nn.Module) -> None:
    """Deterministic values for every parameter and buffer, in sorted key order (as in the golden script)."""
    g = torch.Generator().manual_seed(0)
    sd = model.state_dict()
    for k in sorted(sd):
        t = sd[k]
        if k.endswith("num_batches_tracked"):
            continue
        v = torch.rand(t.shape, generator=g, dtype=torch.float64)
        if k.endswith("running_var"):
            t.copy_(0.5 + v)
        elif t.ndim >= 2:
            t.copy_((v - 0.5) * 2 / (t[0].numel() ** 0.5))
        else:
            t.copy_(v - 0.5)


def golden_inputs() -> torch.Tensor:
    n = torch.arange(4 * 3 * 8 * 8, dtype=torch.float64)
    return torch.sin(0.05 * n).reshape(4, 3, 8, 8) + 0.3 * torch.cos(0.011 * n * n).reshape(4, 3, 8, 8)
