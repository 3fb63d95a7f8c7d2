"""Batched image augmentation on tensors, run on the training device (``on_after_batch_transfer``).

All functions take NCHW batches and use the torch RNG of the batch's device (seeded by ``seed_everything``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad every image by ``padding`` pixels and cut a random HxW window out of each (one offset per image)."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = ox[:, None] + torch.arange(w, device=x.device)
    out = torch.gather(padded, 2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return torch.gather(out, 3, cols[:, None, None, :].expand(n, c, h, w))


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def device_augment(x: torch.Tensor, mode: str = "standard", generator: torch.Generator | None = None) -> torch.Tensor:
    """The package's batched training augmentation, on the batch's device: pad-4 random crop and horizontal flip
    (``"standard"``, also after the worker-side ``"autoaugment"`` / ``"colorjitter"`` policies), the crop alone
    (``"crop"``) or nothing (``"none"``). Used by the DataModules and by callbacks that re-predict the training set
    with the training augmentation, so both always augment alike."""
    if mode == "none":
        return x
    x = random_crop(x, 4, generator)
    return x if mode == "crop" else random_hflip(x, 0.5, generator)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (0-255) or float (0-1) images -> float32 ``(x - mean) / std`` per channel."""
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / scale - m) / s


def model_input(image: torch.Tensor, datamodule: Any, device: torch.device | str | None = None, augment: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DataModule images -> model input: the one helper callbacks and tools use (probes, coresets, selection).

    uint8 images are moved to ``device``, optionally given the DataModule's own crop / flip (``augment``, drawn from
    ``generator``) and normalized with the DataModule's ``mean`` / ``std``; float images are already model input and
    are only moved. A DataModule with uint8 images must define ``mean`` and ``std`` (the DataModule protocol in
    ARCHITECTURE.md); there is no silent fallback, because a wrong normalization changes every result.

    Raises:
        ValueError: uint8 images from a DataModule without ``mean`` / ``std``.
    """
    if device is not None:
        image = image.to(device, non_blocking=True)
    if image.dtype != torch.uint8:
        return image if image.is_floating_point() else image.float()
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        raise ValueError(f"{type(datamodule).__name__} yields uint8 images but defines no mean/std to normalize them "
                         "with; give the DataModule `mean` and `std` attributes (per-channel, 0-1 scale)")
    if augment:
        image = device_augment(image, getattr(datamodule, "augment", "standard"), generator)
    return normalize(image, mean, std)


def mix_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    cutmix_alpha: float = 0.0,
    mixup_alpha: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-level CutMix (Yun et al., arXiv 1905.04899) or MixUp (Zhang et al., arXiv 1710.09412).

    One mixing coefficient and one box per batch, partner = the batch in reverse order (no host sync: the random
    numbers are drawn on the host). With both alphas > 0 one of the two is chosen with probability 1/2.

    Returns:
        The mixed images and the soft targets ``lam * onehot(y) + (1 - lam) * onehot(y_partner)``, where ``lam``
        is the exact kept area for CutMix.
    """
    rng = rng if rng is not None else np.random.default_rng()
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    onehot = F.one_hot(target, num_classes).float()
    partner_img, partner_t = image.flip(0), onehot.flip(0)
    if use_cutmix:
        h, w = image.shape[-2:]
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        image = image.clone()
        image[..., y1:y2, x1:x2] = partner_img[..., y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    elif mixup_alpha > 0:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        image = image * lam + partner_img * (1.0 - lam)
    else:
        return image, onehot
    return image, onehot * lam + partner_t * (1.0 - lam)
