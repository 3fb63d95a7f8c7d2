"""An offline ImageNet-layout demo tree cut from the two JPEG photographs that ship with scikit-learn
(``sklearn.datasets.load_sample_images``: ``china.jpg`` and ``flower.jpg``, 427 x 640).

Four classes, one per half of each photograph (``china_top``, ``china_bottom``, ``flower_top``, ``flower_bottom``).
Training crops come from the left 70 % of a half, validation crops from the right 30 %, so no validation pixel is
seen in training. Crops have random sides between half of ``size`` and ``size`` and are written as JPEG (quality 90)
to ``train/<class>/<class>_<n>.JPEG`` and ``val/<class>/<class>_val_<n>.JPEG``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("china_bottom", "china_top", "flower_bottom", "flower_top")  # sorted: label order


def _regions() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    out = {}
    for name, image in zip(("china", "flower"), photos.images):
        h = image.shape[0] // 2
        out[f"{name}_top"], out[f"{name}_bottom"] = image[:h], image[h:]
    return out


def _save(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())


def write_demo_tree(out: str | Path, per_class: int = 32, val_per_class: int = 8, size: int = 128,
                    seed: int = 0) -> dict[str, Any]:
    """Write the demo tree under ``out`` (see the module docstring); returns counts."""
    out = Path(out).expanduser()
    rng = np.random.default_rng(seed)
    regions = _regions()
    for name in CLASSES:
        region = regions[name]
        h, w = region.shape[:2]
        cut = int(0.7 * w)
        for split, count, (x0, x1) in (("train", per_class, (0, cut)), ("val", val_per_class, (cut, w))):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                ch = int(rng.integers(size // 2, min(size, h) + 1))
                cw = int(rng.integers(size // 2, min(size, x1 - x0) + 1))
                top = int(rng.integers(0, h - ch + 1))
                left = x0 + int(rng.integers(0, x1 - x0 - cw + 1))
                suffix = "_val" if split == "val" else ""
                _save(region[top : top + ch, left : left + cw], folder / f"{name}{suffix}_{n + 1}.JPEG")
    return {"root": str(out), "classes": len(CLASSES), "train": per_class * len(CLASSES),
            "val": val_per_class * len(CLASSES)}
