"""Readers of the on-disk formats of ImageNet-scale data sets: class folders, class lists, WebVision list files and
the ILSVRC2012 validation ground truth.

- ImageNet (ILSVRC2012) as torchvision's ``ImageFolder`` reads it: ``<root>/train/<wnid>/*.JPEG`` and
  ``<root>/val/<wnid>/*.JPEG``; class ``c`` is the position of its wnid in the sorted list (or in a class list file).
  The validation images come as one flat folder; ``lightning-methods prepare-data sort-val`` sorts them into class
  folders from the official ground truth (:func:`read_val_ground_truth`).
- Class lists (ImageNet-200 of HPN, subsets): one WordNet id per line, optionally followed by text
  (``n01440764 tench``); ``#`` comments and blank lines are skipped.
- WebVision 1.0 (Li et al., arXiv 1708.02862): ``info/train_filelist_google.txt`` with ``google/q0001/0000001.jpg
  <label>`` lines (paths relative to the root), ``info/val_filelist.txt`` with ``<file> <label>`` lines for the images
  in ``val_images_256/``; labels 0..999 follow ``info/synsets.txt`` (the sorted ILSVRC2012 wnids).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
VAL_COUNT = 50000
_WNID = re.compile(r"^n\d{8}$")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def read_class_list(path: str | Path) -> list[str]:
    """The class ids of a class list file, in file order (first token per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class list file {path} does not exist; give a text file with one class id "
                                "(e.g. a WordNet id n01440764) per line")
    classes = [line.split()[0] for line in path.read_text().splitlines() if line.strip()
               and not line.lstrip().startswith("#")]
    seen = set()
    dup = [c for c in classes if c in seen or seen.add(c)]
    if not classes or dup:
        raise ValueError(f"{path}: a class list needs distinct class ids, one per line; "
                         + (f"{dup[0]!r} appears twice" if dup else "the file is empty"))
    return classes


def list_class_folders(folder: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` (the classes of an ``ImageFolder`` tree)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; expected class folders <wnid>/*.JPEG inside it")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders{_flat_folder_hint(folder)}")
    return classes


def _flat_folder_hint(folder: Path) -> str:
    """The sort-val command, where ``folder`` holds images directly (the flat ILSVRC2012 validation folder)."""
    loose = next((p.name for p in folder.iterdir() if _is_image(p)), None) if folder.is_dir() else None
    if loose is None:
        return ""
    return (f" ({folder} holds images such as {loose} directly: a flat validation folder? sort it with "
            f"`lightning-methods prepare-data sort-val {folder} --ground_truth ...`)")


def scan_image_folder(folder: str | Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Files (sorted per class) and labels of ``folder/<class>/*`` for the given ordered ``classes``.

    Raises:
        FileNotFoundError: a class folder is missing or holds no image (naming it).
    """
    folder = Path(folder).expanduser()
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"class folder {sub} is missing (class {label} of {len(classes)}); every class "
                                    f"of the class list needs a folder <root>/<split>/<class>/ with its images"
                                    + _flat_folder_hint(folder))
        found = sorted(str(p) for p in sub.iterdir() if _is_image(p))
        if not found:
            raise FileNotFoundError(f"class folder {sub} holds no .JPEG/.jpg/.png images")
        files += found
        labels += [label] * len(found)
    return files, labels


def read_file_list(root: str | Path, list_file: str | Path, prefix: str = "", num_classes: int | None = None
                   ) -> tuple[list[str], list[int]]:
    """``(<file> <label>)`` lines of a list file (WebVision): files resolved as ``root/prefix/<file>``, lines with a
    label ``>= num_classes`` skipped (mini-WebVision keeps the first 50 classes)."""
    root, list_file = Path(root).expanduser(), Path(list_file).expanduser()
    if not list_file.is_file():
        raise FileNotFoundError(f"list file {list_file} does not exist; expected the WebVision release layout "
                                f"({root}/info/train_filelist_google.txt, {root}/info/val_filelist.txt)")
    files, labels = [], []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ValueError(f"{list_file}, line {n}: expected '<relative path> <label>', got {line!r}")
        label = int(parts[1])
        if num_classes is not None and label >= num_classes:
            continue
        files.append(str(root / prefix / parts[0]))
        labels.append(label)
    if not files:
        raise ValueError(f"{list_file} lists no image of the first {num_classes} classes")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {list_file} are missing, e.g. {missing[0]}")
    return files, labels


# ---------------------------------------------------------------------------------------------------- val ground truth
def _devkit_synsets(meta: Path) -> dict[int, str]:
    """``ILSVRC2012_ID -> wnid`` of the 1000 leaf synsets in the devkit's ``meta.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError as err:  # scipy ships with scikit-learn, a dependency
        raise ImportError("reading the devkit's meta.mat needs scipy (pip install scipy)") from err
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    ids = [int(v) for v in synsets["ILSVRC2012_ID"]]
    wnids = [str(v) for v in synsets["WNID"]]
    children = [int(v) for v in synsets["num_children"]]
    return {i: w for i, w, c in zip(ids, wnids, children) if c == 0}


def read_val_ground_truth(ground_truth: str | Path, meta: str | Path | None = None,
                          expected: int | None = VAL_COUNT) -> dict[str, str]:
    """``{image file stem: wnid}`` of the ILSVRC2012 validation images from the official ground truth.

    Two formats:

    - ``LOC_val_solution.csv`` (ImageNet Object Localization Challenge): ``ImageId,PredictionString`` rows whose
      prediction string starts with the wnid (``n01751748 123 45 300 250 ...``);
    - the devkit's ``ILSVRC2012_validation_ground_truth.txt``: one ILSVRC2012_ID (1..1000) per line for
      ``ILSVRC2012_val_00000001`` onwards, mapped to wnids by the devkit's ``meta.mat`` (``meta``; default: beside
      the file).

    Raises:
        ValueError: a malformed line, an unknown class id, or not ``expected`` images (naming the file).
    """
    path = Path(ground_truth).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file {path} does not exist; give LOC_val_solution.csv or the devkit's "
                                "ILSVRC2012_validation_ground_truth.txt")
    labels: dict[str, str] = {}
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: expected the header 'ImageId,PredictionString' of LOC_val_solution.csv")
        for n, row in enumerate(rows[1:], 2):
            if not row:
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if not tokens or not _WNID.match(tokens[0]):
                raise ValueError(f"{path}, line {n}: expected '<ImageId>,<wnid> <box> ...', got {','.join(row)!r}")
            labels[row[0].strip()] = tokens[0]
    else:
        meta = Path(meta).expanduser() if meta else path.parent / "meta.mat"
        if not meta.is_file():
            raise FileNotFoundError(f"{path} holds class ids 1..1000 that the devkit's meta.mat maps to wnids, and "
                                    f"{meta} does not exist; pass --meta .../ILSVRC2012_devkit_t12/data/meta.mat")
        synsets = _devkit_synsets(meta)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if not line.strip().isdigit() or int(line) not in synsets:
                raise ValueError(f"{path}, line {n}: {line.strip()!r} is not an ILSVRC2012_ID of {meta}")
            labels[f"ILSVRC2012_val_{n:08d}"] = synsets[int(line)]
    if expected is not None and len(labels) != expected:
        raise ValueError(f"{path} labels {len(labels)} images, ILSVRC2012's validation set has {expected}: a "
                         "truncated or wrong file (pass --expected N for a subset)")
    return labels
