"""CelebA (Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015), aligned-and-cropped faces
(178x218), a far-OOD / global-domain set for CIFAR models.

Official layout (torchvision's): ``data_dir/celeba/img_align_celeba/<000001>.jpg`` and
``data_dir/celeba/list_eval_partition.txt`` (``<file> <0|1|2>`` for train / valid / test). Images are resized
(shorter side ``image_size``) and centre-cropped. Labels: the identity from ``identity_CelebA.txt`` when present,
else 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_methods.datamodules.ood_images import OODImageDataModule, load_images

PARTITIONS = {"train": 0, "valid": 1, "test": 2}


class CelebADataModule(OODImageDataModule):
    """CelebA faces.

    Args:
        data_dir: folder that holds (or receives) ``celeba/``.
        max_samples: keep only the first ``max_samples`` images of a split (the test split has 19,962), ``None``
            keeps all.
        **kwargs: see :class:`OODImageDataModule` (splits ``"train"``, ``"valid"``, ``"test"``, ``"all"``).
    """

    num_classes = 1
    display_name = "CelebA"
    splits = ("train", "valid", "test", "all")
    url = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"

    def __init__(self, data_dir: str = "data", download: bool = True, image_size: int = 32,
                 max_samples: int | None = None, train_split: str = "train", test_split: str = "test",
                 **kwargs) -> None:
        super().__init__(data_dir=data_dir, download=download, image_size=image_size, train_split=train_split,
                         test_split=test_split, **kwargs)
        self.max_samples = max_samples

    @property
    def folder(self) -> Path:
        return self.data_dir / "celeba"

    def _entries(self, split: str) -> list[str]:
        path = self.folder / "list_eval_partition.txt"
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"{path}, line {n}: expected '<file> <0|1|2>', got {line!r}")
            if split == "all" or int(parts[1]) == PARTITIONS[split]:
                out.append(parts[0])
        return out[: self.max_samples] if self.max_samples is not None else out

    def missing(self, split: str) -> list[Path]:
        part = self.folder / "list_eval_partition.txt"
        if not part.is_file():
            return [part]
        images = self.folder / "img_align_celeba"
        return [images / f for f in self._entries(split) if not (images / f).is_file()][:1]

    def download_files(self) -> None:  # pragma: no cover - needs internet (Google Drive)
        from torchvision.datasets import CelebA

        CelebA(str(self.data_dir), split="all", download=True)

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_files(split)
        files = self._entries(split)
        identity = {}
        id_file = self.folder / "identity_CelebA.txt"
        if id_file.is_file():
            identity = {p[0]: int(p[1]) for p in (ln.split() for ln in id_file.read_text().splitlines()) if len(p) == 2}
        labels = torch.tensor([identity.get(f, 0) for f in files], dtype=torch.int64)
        return load_images([self.folder / "img_align_celeba" / f for f in files], self.image_size), labels
