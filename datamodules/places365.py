"""Places365 (Zhou et al., "Places: A 10 Million Image Database for Scene Recognition", TPAMI 2017), a far-OOD set of
OpenOOD's CIFAR benchmarks.

Two layouts:

- torchvision's small-image release (256x256): ``data_dir/places365/val_256/Places365_val_<n>.jpg`` with
  ``places365_val.txt`` (``<file> <class>``), ``data_256/<letter>/<class>/<n>.jpg`` with
  ``places365_train_standard.txt`` and ``categories_places365.txt``; splits ``"val"`` (36,500 images) and ``"train"``.
- OpenOOD's subset (``image_list`` given; split ``"list"``): the benchmark list (``benchmark_imglist/cifar100/
  test_places365.txt``: ``<relative path> <label>`` per line) with paths relative to ``image_root`` (OpenOOD's
  ``images_classic/``; default ``data_dir``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_methods.datamodules.ood_images import OODImageDataModule, load_images, read_image_list

LIST_FILES = {"val": ("val_256", "places365_val.txt"), "train": ("data_256", "places365_train_standard.txt")}


class Places365DataModule(OODImageDataModule):
    """Places365 scenes.

    Args:
        data_dir: folder that holds (or receives) ``places365/``.
        image_list: an OpenOOD benchmark list selecting the subset used as OOD data (enables split ``"list"``,
            which becomes the default test split).
        image_root: root of the list's relative paths (default ``data_dir``).
        max_samples: keep the first ``max_samples`` entries of a split (``None``: all).
        **kwargs: see :class:`OODImageDataModule`.
    """

    num_classes = 365
    display_name = "Places365"
    splits = ("val", "train", "list")
    url = "http://places2.csail.mit.edu/download.html"

    def __init__(self, data_dir: str = "data", download: bool = True, image_size: int = 32,
                 image_list: str | None = None, image_root: str | None = None, max_samples: int | None = None,
                 train_split: str = "val", test_split: str | None = None, **kwargs) -> None:
        test = test_split or ("list" if image_list else "val")
        super().__init__(data_dir=data_dir, download=download, image_size=image_size, train_split=train_split,
                         test_split=test, **kwargs)
        if "list" in (train_split, test) and not image_list:
            raise ValueError("Places365 split 'list' needs image_list (an OpenOOD benchmark list)")
        self.image_list = Path(image_list).expanduser() if image_list else None
        self.image_root = Path(image_root).expanduser() if image_root else self.data_dir
        self.max_samples = max_samples

    @property
    def folder(self) -> Path:
        return self.data_dir / "places365"

    def _entries(self, split: str) -> list[tuple[Path, int]]:
        if split == "list":
            entries = [(self.image_root / p, label) for p, label in read_image_list(self.image_list)]
        else:
            images, listing = LIST_FILES[split]
            entries = [(self.folder / images / p.lstrip("/"), label)
                       for p, label in read_image_list(self.folder / listing)]
        return entries[: self.max_samples] if self.max_samples is not None else entries

    def missing(self, split: str) -> list[Path]:
        listing = self.image_list if split == "list" else self.folder / LIST_FILES[split][1]
        if not listing.is_file():
            return [listing]
        return [p for p, _ in self._entries(split) if not p.is_file()][:1]

    def download_files(self) -> None:  # pragma: no cover - needs internet
        from torchvision.datasets import Places365

        for split in {self.train_split, self.test_split} - {"list"}:
            Places365(str(self.folder), split="val" if split == "val" else "train-standard", small=True,
                      download=True)

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_files(split)
        entries = self._entries(split)
        labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
        return load_images([p for p, _ in entries], self.image_size), labels
