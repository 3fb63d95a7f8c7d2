"""Tiny data trees in the real on-disk formats of ImageNet-scale data sets (real JPEG bytes, written with PIL).

- :func:`write_imagenet_tree`: ILSVRC2012 as ``train/<wnid>/<wnid>_<n>.JPEG`` and ``val/`` either sorted
  (``val/<wnid>/ILSVRC2012_val_<n>.JPEG``) or flat, with the official ground truth: ``LOC_val_solution.csv``
  (``ImageId,PredictionString``) and the devkit's ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt``
  (class ids 1..K in image-number order) with its ``meta.mat`` (``synsets`` struct array; the ids are deliberately
  not in sorted-wnid order, as in the real devkit, plus one non-leaf synset).
- :func:`write_webvision_tree`: WebVision 1.0 (``info/train_filelist_google.txt``, ``info/val_filelist.txt``,
  ``info/synsets.txt``, ``google/q<class>/<n>.jpg``, ``val_images_256/val<n>.jpg``).
- :func:`write_class_list`: a class list file (ImageNet-200 style, ``<wnid> <words>`` lines).

Every image has its own size (landscape and portrait) and a class-dependent color, so a tiny model can learn the
classes. The expected labels are returned for checks.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def wnid(c: int) -> str:
    """A WordNet-id-shaped class name; sorted order = class order."""
    return f"n{1440764 + 1000 * c:08d}"


def jpeg_bytes(rng: np.random.Generator, c: int, size: tuple[int, int], quality: int = 90) -> bytes:
    """A ``size`` = (height, width) RGB JPEG whose mean color depends on class ``c``."""
    h, w = size
    base = np.array([(50 + 70 * c) % 256, (200 - 45 * c) % 256, (90 + 110 * c) % 256], dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    wave = 25 * np.sin(xx[..., None] / (3 + c) + yy[..., None] / 5.0)
    img = np.clip(base + wave + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _size(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    if rng.random() < 0.5:
        h, w = w, h
    return h + int(rng.integers(0, 5)), w + int(rng.integers(0, 5))


def write_imagenet_tree(root: str | Path, classes: int = 4, per_class: int = 3, val_per_class: int = 2,
                        size: tuple[int, int] = (40, 48), flat_val: bool = False, seed: int = 0) -> Path:
    """Write an ILSVRC2012-layout tree under ``root`` and return ``root``.

    With ``flat_val`` the validation images sit directly in ``val/`` and the ground truth is written as
    ``LOC_val_solution.csv`` and as the devkit files; otherwise ``val/<wnid>/`` holds them. ``root/labels.txt`` lists
    ``<relative path> <label>`` of every image (the expected answer).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    answers = []
    for c in range(classes):
        folder = root / "train" / wnid(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            name = f"{wnid(c)}_{i + 1}.JPEG"
            (folder / name).write_bytes(jpeg_bytes(rng, c, _size(rng, size)))
            answers.append(f"train/{wnid(c)}/{name} {c}")
    val_labels = [c for _ in range(val_per_class) for c in range(classes)]
    rng.shuffle(val_labels)
    (root / "val").mkdir(parents=True, exist_ok=True)
    for n, c in enumerate(val_labels, 1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        rel = Path("val") / (name if flat_val else f"{wnid(c)}/{name}")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg_bytes(rng, c, _size(rng, size)))
        answers.append(f"{rel.as_posix()} {c}")
    if flat_val:
        write_ground_truth(root, val_labels, classes)
    (root / "labels.txt").write_text("\n".join(answers) + "\n")
    return root


def devkit_ids(classes: int) -> list[int]:
    """The devkit's ILSVRC2012_ID of each class (label order): a fixed permutation of 1..K, not the sorted order."""
    return [((3 * c) % classes) + 1 if classes % 3 else classes - c for c in range(classes)]


def write_ground_truth(root: Path, val_labels: list[int], classes: int) -> None:
    """``LOC_val_solution.csv`` and the devkit's ground truth + ``meta.mat`` for validation images 1..V."""
    from scipy.io import savemat

    rows = ["ImageId,PredictionString"]
    rows += [f"ILSVRC2012_val_{n:08d},{wnid(c)} 1 2 30 35 {wnid(c)} 4 5 20 25" for n, c in enumerate(val_labels, 1)]
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True, exist_ok=True)
    ids = devkit_ids(classes)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[c]}\n" for c in val_labels))
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((classes + 1, 1), dtype=[(f, "O") for f in fields])
    for row, (sid, name, kids) in enumerate([*[(ids[c], wnid(c), 0) for c in range(classes)],
                                             (classes + 1, "n00001740", 2)]):
        synsets[row, 0] = (sid, name, f"class {name}", "a tiny test class", kids, np.zeros(kids), 0, 3)
    savemat(str(data / "meta.mat"), {"synsets": synsets})


def write_webvision_tree(root: str | Path, classes: int = 3, extra_classes: int = 2, per_class: int = 3,
                         val_per_class: int = 2, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """Write a WebVision 1.0 tree with ``classes + extra_classes`` labelled classes (the extra ones lie beyond a
    ``classes``-class mini-WebVision and must be skipped) and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "info").mkdir(parents=True, exist_ok=True)
    total = classes + extra_classes
    train, val = [], []
    for c in range(total):
        for i in range(per_class):
            rel = f"google/q{c + 1:04d}/{i + 1:07d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(jpeg_bytes(rng, c, _size(rng, size)))
            train.append(f"{rel} {c}")
        for i in range(val_per_class):
            name = f"val{c * val_per_class + i + 1:06d}.jpg"
            (root / "val_images_256").mkdir(exist_ok=True)
            (root / "val_images_256" / name).write_bytes(jpeg_bytes(rng, c, _size(rng, size)))
            val.append(f"{name} {c}")
    order = rng.permutation(len(train))
    (root / "info" / "train_filelist_google.txt").write_text("\n".join(train[i] for i in order) + "\n")
    (root / "info" / "val_filelist.txt").write_text("\n".join(val) + "\n")
    (root / "info" / "synsets.txt").write_text("".join(f"{wnid(c)} class {c}\n" for c in range(total)))
    return root


def write_class_list(path: str | Path, wnids: list[str]) -> Path:
    """An ImageNet-200-style class list file (``<wnid> <words>`` per line)."""
    path = Path(path)
    path.write_text("# class list\n" + "".join(f"{w} words for {w}\n" for w in wnids))
    return path


def read_answers(root: str | Path) -> dict[str, int]:
    """``{relative path: label}`` written by :func:`write_imagenet_tree`."""
    lines = (Path(root) / "labels.txt").read_text().split("\n")
    return {p: int(c) for p, c in (line.split() for line in lines if line)}
