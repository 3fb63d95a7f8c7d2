"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes) as a CIFAR-shaped dataset.

The images ship inside scikit-learn, so this DataModule works offline; it backs the quickstart and the learning
tests. Images are scaled to uint8, upsampled to 32x32 (bilinear) and repeated to 3 channels; the train / val /
test split is seeded and stratified.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_methods.datamodules.base import Augment, ImageDataModule


def load_digits_uint8(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as uint8 images (N, 3, size, size) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # values 0..16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    return x.contiguous(), torch.from_numpy(digits.target).long()


class DigitsDataModule(ImageDataModule):
    """Digits upscaled to 32x32x3 with a seeded, stratified train / val / test split.

    Args:
        val_fraction: fraction of the images in the validation split.
        test_fraction: fraction of the images in the test split.
        batch_size: training batch size (64).
        num_workers: DataLoader workers (0: the data is tiny).
        augment: ``"none"`` by default; ``"crop"`` is safe for digits, flips are not (they change the class).
        **kwargs: every other argument of :class:`ImageDataModule` (``eval_batch_size``, ``gpu_resident``,
            ``cutmix_alpha``, ``mixup_alpha``, ``seed``, ``pin_memory``), by keyword; ``val_split`` is refused
            (the split is ``val_fraction``).
    """

    num_classes = 10

    def __init__(
        self,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: Augment = "none",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("val_split"):
            raise ValueError(f"DigitsDataModule splits the digits with val_fraction / test_fraction; val_split "
                             f"({kwargs['val_split']}) is not used: set data.init_args.val_fraction instead")
        super().__init__(batch_size=batch_size, num_workers=num_workers, augment=augment, **kwargs)
        if val_fraction < 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError("need 0 <= val_fraction, 0 < test_fraction and val_fraction + test_fraction < 1")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def _split_positions(self, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
        for c in range(self.num_classes):
            pos = (targets == c).nonzero().flatten()
            pos = pos[torch.randperm(len(pos), generator=g)]
            n_test, n_val = round(self.test_fraction * len(pos)), round(self.val_fraction * len(pos))
            parts["test"].append(pos[:n_test])
            parts["val"].append(pos[n_test : n_test + n_val])
            parts["train"].append(pos[n_test + n_val :])
        return {k: torch.cat(v).sort().values for k, v in parts.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from lightning_methods.datamodules.base import IndexedTensorDataset

        images, targets = load_digits_uint8()
        pos = self._split_positions(targets)
        train = images[pos["train"]].float() / 255
        self.mean = tuple(train.mean(dim=(0, 2, 3)).tolist())
        self.std = tuple(train.std(dim=(0, 2, 3)).tolist())
        ds = {k: IndexedTensorDataset(images[p], targets[p], p) for k, p in pos.items()}
        ds["train"].transform, ds["train"].seed = self._worker_transform(), self.seed  # augment="colorjitter" etc.
        self.train_set, self.test_set = ds["train"], ds["test"]
        self.val_set = ds["val"] if len(pos["val"]) else ds["test"]
