"""A small Tiny-ImageNet release in the official folder layout (JPEG files, wnids.txt, val_annotations.txt), for the
reader tests and the Tiny-ImageNet config runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_fake_tinyimagenet(root: str | Path, wnids: tuple[str, ...] = ("n02", "n01", "n03"), per_class: int = 4,
                            n_val: int = 6, seed: int = 0, gray: bool = True) -> Path:
    """Write ``root/tiny-imagenet-200/`` with ``per_class`` training images per wnid (``wnids.txt`` deliberately
    unsorted) and ``n_val`` validation images; one training image is grayscale when ``gray``. Returns the folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(root) / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tclass {w}\n" for w in wnids))
    for c, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True, exist_ok=True)
        boxes = []
        for i in range(per_class):
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            img = Image.fromarray(arr[..., 0], "L") if gray and c == 0 and i == 0 else Image.fromarray(arr)
            img.save(images / f"{wnid}_{i}.JPEG", quality=95)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    lines = []
    for i in range(n_val):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "val" / "images" /
                                                                                 f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t1\t2\t60\t61")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder
