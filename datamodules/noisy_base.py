"""Label-noise machinery shared by the noisy DataModules (CIFAR-10/100, digits).

The mixin plugs into :class:`ImageDataModule` through its ``train_targets`` hook: the noisy labels become ``"target"``
and the true labels travel as ``"clean_target"`` (analysis only: no loss of this package reads it). It also replaces
the hold-out split by the official Early Cutting split (``RandomState(seed).choice`` of 90%, noisy labels in both
parts), restricts training to a subset of base indices (for sample-selection rounds), saves / reloads the generated
labels, and logs the realized noise rates.

Base indices are positions in the full official training split (0..49999 for CIFAR); ``"index"`` in batches is
always a base index, whatever subset is trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities import rank_zero_info

from lightning_methods.datamodules.base import IndexedTensorDataset
from lightning_methods.datamodules.label_noise import NoiseType, make_noisy_labels
from lightning_methods.utils.io import safe_torch_load

NOISE_TYPES = ("none", "sym", "pairflip", "asym", "instance", "cifarn")


def load_index_file(path: str | Path) -> torch.Tensor:
    """Base indices from ``.npy`` / ``.pt`` / ``.json`` (a list) / text (one index per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"train_subset file {path} does not exist")
    if path.suffix == ".npy":
        values: Any = np.load(path)
    elif path.suffix == ".pt":
        values = safe_torch_load(path, what="train_subset file")
    elif path.suffix == ".json":
        values = json.loads(path.read_text())
    else:
        values = [int(v) for v in path.read_text().split()]
    return torch.as_tensor(np.asarray(values), dtype=torch.long).reshape(-1)


def subset_positions(base_indices: torch.Tensor, indices: Any) -> torch.Tensor:
    """Positions in a training split (whose samples carry ``base_indices``) of the samples named by ``indices``: a
    sequence or the path of a ``.npy`` / ``.pt`` / ``.json`` / text file of base indices (duplicates ignored).

    Raises:
        ValueError: an index that is not in the split (a validation-split index, or out of range).
    """
    idx = load_index_file(indices) if isinstance(indices, (str, Path)) else torch.as_tensor(indices).long()
    idx = torch.unique(idx.reshape(-1))
    keep = torch.isin(base_indices, idx)
    if int(keep.sum()) != len(idx):
        missing = idx[~torch.isin(idx, base_indices)]
        raise ValueError(
            f"{len(missing)} train_subset indices are not in the training split (e.g. {missing[:5].tolist()}): "
            "base indices of the validation split or out of range"
        )
    return keep.nonzero().flatten()


class NoisyLabelsMixin:
    """Mixin for :class:`ImageDataModule` subclasses; call :meth:`_init_noise` in ``__init__``."""

    train_set: IndexedTensorDataset | None
    num_classes: int

    def _init_noise(
        self,
        *,
        noise_type: NoiseType,
        noise_rate: float,
        noise_seed: int | None,
        include_noise: bool,
        asym_grouping: str | None,
        cifarn_file: str | None,
        cifarn_key: str | None,
        label_file: str | None,
        train_subset: list[int] | str | None,
    ) -> None:
        if noise_type == "pair":
            noise_type = "pairflip"
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
        if not 0.0 <= noise_rate <= 1.0:
            raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
        if noise_type == "cifarn" and not cifarn_file:
            raise ValueError("noise_type='cifarn' needs data.init_args.cifarn_file: the path of a CIFAR-N *_human.pt "
                             "file (https://github.com/UCSC-REAL/cifar-10-100n); it is never downloaded implicitly")
        self.noise_type: NoiseType = noise_type
        self.noise_rate = noise_rate
        self.noise_seed = self.seed if noise_seed is None else noise_seed
        self.include_noise = include_noise
        self.asym_grouping = asym_grouping
        self.cifarn_file, self.cifarn_key = cifarn_file, cifarn_key
        self.label_file = label_file
        self.train_subset = train_subset
        self.noisy_targets: torch.Tensor | None = None  # over all base indices
        self.clean_targets: torch.Tensor | None = None
        self.full_train_set: IndexedTensorDataset | None = None
        self.noise_stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------------- dataset-specific hooks
    def asym_spec(self, clean: np.ndarray) -> dict[str, Any]:
        """``{"asym_groups": ...}`` or ``{"asym_map": ...}`` for asymmetric noise (default: cyclic i -> i+1)."""
        return {}

    def default_cifarn_key(self) -> str:
        return "noisy_label"

    # ------------------------------------------------------------------------------------- labels
    def _noise_meta(self, n: int) -> dict[str, Any]:
        return {"noise_type": self.noise_type, "noise_rate": float(self.noise_rate), "noise_seed": int(self.noise_seed),
                "include_noise": bool(self.include_noise), "asym_grouping": self.asym_grouping,
                "cifarn_key": self.cifarn_key, "num_samples": int(n), "num_classes": int(self.num_classes)}

    def generate_noisy_labels(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        clean = targets.numpy()
        extra: dict[str, Any] = {}
        if self.noise_type == "asym":
            extra = self.asym_spec(clean)
        if self.noise_type == "instance":  # raw uint8 pixels in HWC order, as the official generator flattens them
            extra["images"] = images.permute(0, 2, 3, 1).numpy()
        noisy = make_noisy_labels(clean, self.noise_type, self.noise_rate, self.num_classes, self.noise_seed,
                                  include_noise=self.include_noise, cifarn_file=self.cifarn_file,
                                  cifarn_key=self.cifarn_key or self.default_cifarn_key(), **extra)
        return torch.from_numpy(np.asarray(noisy, dtype=np.int64))

    def _load_or_make_labels(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        meta = self._noise_meta(len(targets))
        path = Path(self.label_file).expanduser() if self.label_file else None
        if path is not None and path.is_file():
            saved = safe_torch_load(path, what="noisy label file")
            if saved.get("meta") != meta or not torch.equal(saved["clean"], targets):
                raise ValueError(
                    f"label file {path} was generated for another setup ({saved.get('meta')}) than this one ({meta}); "
                    "delete it or point data.init_args.label_file elsewhere"
                )
            return saved["noisy"].long()
        noisy = self.generate_noisy_labels(images, targets)
        if path is not None and rank_zero_only.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
            torch.save({"noisy": noisy, "clean": targets.clone(), "meta": meta}, tmp)
            os.replace(tmp, path)
        return noisy

    def train_targets(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        noisy = self._load_or_make_labels(images, targets)
        self.noisy_targets, self.clean_targets = noisy, targets.clone()
        return {"target": noisy, "clean_target": targets.clone()}

    # ------------------------------------------------------------------------------------- split and subset
    def holdout_split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The official split: ``RandomState(seed).choice(n, int(n * (1 - val_split)), replace=False)`` trains, the
        rest validates (noisy labels in both); returned sorted."""
        rng = np.random.RandomState(self.seed)
        train = np.sort(rng.choice(n, int(n * (1.0 - self.val_split)), replace=False))
        val = np.setdiff1d(np.arange(n), train)
        return torch.from_numpy(train).long(), torch.from_numpy(val).long()

    def setup(self, stage: str | None = None) -> None:
        first = self.train_set is None
        super().setup(stage)  # type: ignore[misc]
        if not first:
            return
        self.full_train_set = self.train_set
        if self.train_subset is not None:
            self.set_train_subset(self.train_subset)
        self._record_noise_stats()

    def set_train_subset(self, indices: list[int] | np.ndarray | torch.Tensor | str | None) -> None:
        """Train on the samples with these base indices only (``None``: the whole training split).

        Accepts a sequence or the path of a ``.npy`` / ``.pt`` / ``.json`` / text file of base indices.
        """
        self.train_subset = indices
        if self.full_train_set is None:  # applied in setup()
            return
        full = self.full_train_set
        if indices is None:
            self.train_set = full
            return
        self.train_set = self._subset_dataset(full, subset_positions(full.indices, indices))
        if self.noise_stats:
            self._record_noise_stats()

    def _subset_dataset(self, full: IndexedTensorDataset, pos: torch.Tensor) -> IndexedTensorDataset:
        """The samples of ``full`` at positions ``pos`` (file-backed DataModules override this)."""
        return IndexedTensorDataset(full.images[pos], full.targets[pos], full.indices[pos], full.transform,
                                    {k: v[pos] for k, v in full.extras.items()}, seed=full.seed)

    # ------------------------------------------------------------------------------------- reporting
    def _record_noise_stats(self) -> None:
        for name in ("noisy_targets", "clean_targets", "train_set"):
            self._require(name)
        flipped = self.noisy_targets != self.clean_targets
        stats = {"noise/realized_rate": flipped.float().mean().item(),
                 "noise/train_rate": flipped[self.full_train_set.indices].float().mean().item(),
                 "noise/train_subset_rate": flipped[self.train_set.indices].float().mean().item(),
                 "noise/train_subset_size": float(len(self.train_set))}
        if self.val_set is not None and self.val_set is not self.test_set:
            stats["noise/val_rate"] = flipped[self.val_set.indices].float().mean().item()
        self.noise_stats = stats
        rank_zero_info(
            f"{type(self).__name__}: noise {self.noise_type} (nominal {self.noise_rate:.2f}), realized "
            + ", ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in stats.items())
        )
        trainer = getattr(self, "trainer", None)
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_metrics(stats, step=0)
