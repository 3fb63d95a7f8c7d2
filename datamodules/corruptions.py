"""CIFAR-C-style image corruptions, seeded and batched, for synthetic covariate shift.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" (ICLR 2019,
arXiv 1903.12261). Severity parameters are those of the official ``make_cifar_c.py`` (hendrycks/robustness) for 32x32
images; the implementations are this package's (NumPy / SciPy / PIL instead of scikit-image / OpenCV / Wand), so
images are close to, not byte-identical with, the released CIFAR-10-C (use :class:`CIFARCDataModule` for those).

Every random draw of image ``i`` comes from ``(seed, index_i)``: a corrupted set is the same whatever the batching,
the worker or the rank. Inputs and outputs are uint8 NCHW tensors; results are truncated to uint8 as the official
script does (``np.uint8``). ``"identity"`` returns the images unchanged (for tests and baselines).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch

SEVERITY_PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
}
ALIASES = {"jpeg": "jpeg_compression"}


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """x in [0, 1], channels last -> HSV in [0, 1] (scikit-image's convention)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    delta = v - x.min(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(v > 0, delta / v, 0.0)
        safe = np.where(delta > 0, delta, 1.0)
        h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape)
    for k, (r, g, b) in enumerate(choices):
        mask = i == k
        out[..., 0] = np.where(mask, r, out[..., 0])
        out[..., 1] = np.where(mask, g, out[..., 1])
        out[..., 2] = np.where(mask, b, out[..., 2])
    return out


def _per_image(fn: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]) -> Callable:
    """Lift ``fn(image HWC in [0, 1], param, rng) -> HWC float in [0, 1]`` to a batch."""

    def apply(x: np.ndarray, param: float, seed: int, index: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        for n in range(len(x)):
            rng = np.random.default_rng([seed, int(index[n])])
            out[n] = fn(x[n], param, rng)
        return out

    return apply


def _jpeg(img: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.uint8(np.round(img * 255))).save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return np.asarray(out.convert("RGB"), dtype=np.float64) / 255.0


def _pixelate(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    small = Image.fromarray(np.uint8(np.round(img * 255))).resize((int(w * c), int(h * c)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX), dtype=np.float64) / 255.0


def _saturate(img: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    hsv = _rgb_to_hsv(img)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return _hsv_to_rgb(hsv)


def _brightness(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    hsv = _rgb_to_hsv(img)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _hsv_to_rgb(hsv)


def _gaussian_blur(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


def _impulse(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    flip = rng.random(img.shape) < amount  # salt and pepper in equal parts, per value (scikit-image 's&p')
    salt = rng.random(img.shape) < 0.5
    out[flip & salt], out[flip & ~salt] = 1.0, 0.0
    return out


PER_IMAGE = {
    "gaussian_noise": _per_image(lambda x, c, rng: x + rng.normal(size=x.shape, scale=c)),
    "shot_noise": _per_image(lambda x, c, rng: rng.poisson(x * c) / c),
    "impulse_noise": _per_image(_impulse),
    "speckle_noise": _per_image(lambda x, c, rng: x + x * rng.normal(size=x.shape, scale=c)),
    "gaussian_blur": _per_image(_gaussian_blur),
    "contrast": _per_image(lambda x, c, rng: (x - x.mean(axis=(0, 1), keepdims=True)) * c
                           + x.mean(axis=(0, 1), keepdims=True)),
    "brightness": _per_image(_brightness),
    "saturate": _per_image(_saturate),
    "jpeg_compression": _per_image(_jpeg),
    "pixelate": _per_image(_pixelate),
}
CORRUPTIONS = ("identity", *PER_IMAGE)


def corrupt(images: torch.Tensor, name: str, severity: int = 3, seed: int = 0,
            index: torch.Tensor | None = None) -> torch.Tensor:
    """Corrupt a batch of uint8 images (N, 3, H, W).

    Args:
        images: uint8 NCHW images.
        name: one of :data:`CORRUPTIONS` (``"jpeg"`` is an alias of ``"jpeg_compression"``).
        severity: 1 (mild) to 5 (strong).
        seed: seed of the random draws.
        index: per-image ids for the draws (default ``0..N-1``); pass dataset indices for batch-independent results.

    Raises:
        ValueError: unknown corruption, severity outside 1..5, or images that are not uint8 NCHW with 3 channels.
    """
    name = ALIASES.get(name, name)
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {CORRUPTIONS}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"corrupt expects uint8 images of shape (N, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if name == "identity":
        return images.clone()
    idx = np.arange(len(images)) if index is None else index.cpu().numpy()
    x = images.permute(0, 2, 3, 1).numpy().astype(np.float64) / 255.0
    out = PER_IMAGE[name](x, SEVERITY_PARAMS[name][severity - 1], seed, idx)
    out = np.uint8(np.clip(out, 0, 1) * 255)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
