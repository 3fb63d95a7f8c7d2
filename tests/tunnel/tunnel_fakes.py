"""Small CINIC-10 releases in the official folder layout (``CINIC-10/{train,valid,test}/<class>/*.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_fake_cinic(root: str | Path, per_class: int = 2, seed: int = 0, size: int = 32) -> dict[str, np.ndarray]:
    """Write ``per_class`` random RGB PNGs per class and split under ``root/CINIC-10``; returns the arrays written
    (``<split>_x`` uint8 N x 32 x 32 x 3 in class-then-file order, ``<split>_y``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for split in ("train", "valid", "test"):
        xs, ys = [], []
        for label, cls in enumerate(CLASSES):
            d = Path(root) / "CINIC-10" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                x = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(x).save(d / f"{split}_{cls}_{i:04d}.png")
                xs.append(x)
                ys.append(label)
        out[f"{split}_x"], out[f"{split}_y"] = np.stack(xs), np.array(ys)
    return out


def logged_text(run_file: Path) -> str:
    """The records of an offline W&B run file as text (complete: :func:`helpers.read_wandb_records` waits for the
    W&B service to write it)."""
    from helpers import read_wandb_records

    return " ".join(str(r) for r in read_wandb_records(run_file))
