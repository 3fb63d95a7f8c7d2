"""scikit-learn's bundled 8x8 digits with injected label noise: a CPU-sized stand-in for noisy CIFAR.

It works offline (the images ship with scikit-learn) and backs the fast Early Cutting demo config and tests. A
seeded, stratified ``test_fraction`` of the 1797 images is the clean test set; noise is generated on the rest, of
which ``val_split`` is held out as noisy validation data, exactly as for :class:`NoisyCIFAR100DataModule`.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_methods.datamodules.base import Augment, ImageDataModule
from lightning_methods.datamodules.digits import load_digits_uint8
from lightning_methods.datamodules.label_noise import NoiseType
from lightning_methods.datamodules.noisy_base import NoisyLabelsMixin


class NoisyDigitsDataModule(NoisyLabelsMixin, ImageDataModule):
    """Digits (10 classes) with label noise.

    Args:
        noise_type, noise_rate, noise_seed, include_noise, label_file, train_subset: see
            :class:`NoisyCIFAR100DataModule` (``asym`` flips ``i -> i + 1``).
        image_size: side of the (bilinearly upsampled) square images; 8 keeps the originals.
        test_fraction: stratified fraction of the images in the clean test split.
        val_split: fraction of the noisy training part held out as noisy validation data.
        batch_size, eval_batch_size, num_workers, augment, seed: see :class:`ImageDataModule` (``augment="none"``
            by default: flips change digit classes).
        **kwargs: every other argument of :class:`ImageDataModule` (``gpu_resident``, ``cutmix_alpha``,
            ``mixup_alpha``, ``pin_memory``), by keyword.
    """

    num_classes = 10

    def __init__(
        self,
        noise_type: NoiseType = "sym",
        noise_rate: float = 0.4,
        noise_seed: int | None = None,
        include_noise: bool = False,
        label_file: str | None = None,
        train_subset: list[int] | str | None = None,
        image_size: int = 8,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        eval_batch_size: int | None = 512,
        num_workers: int = 0,
        val_split: float = 0.1,
        augment: Augment = "none",
        seed: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         val_split=val_split, augment=augment, seed=seed, **kwargs)
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.image_size, self.test_fraction = image_size, test_fraction
        self._init_noise(noise_type=noise_type, noise_rate=noise_rate, noise_seed=noise_seed,
                         include_noise=include_noise,
                         asym_grouping=None, cifarn_file=None, cifarn_key=None, label_file=label_file,
                         train_subset=train_subset)

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        images, targets = load_digits_uint8(self.image_size)
        g = torch.Generator().manual_seed(self.seed)
        test_pos = []
        for c in range(self.num_classes):
            pos = (targets == c).nonzero().flatten()
            test_pos.append(pos[torch.randperm(len(pos), generator=g)][: round(self.test_fraction * len(pos))])
        is_test = torch.zeros(len(targets), dtype=torch.bool)
        is_test[torch.cat(test_pos)] = True
        train = images[~is_test].float() / 255
        self.mean = tuple(train.mean(dim=(0, 2, 3)).tolist())
        self.std = tuple(train.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
        return {"train": (images[~is_test], targets[~is_test]), "test": (images[is_test], targets[is_test])}
