"""Cached features as data: :class:`EmbeddingSet`, the ID-train-fitted :class:`FeaturePreprocessor` (PCA and the
normalisation variants of EncMin2L's level 1) and :class:`EmbeddingDataModule` for training and scoring RDMs.

Preprocessing (RDM official code ``run.py`` / ``eval.py``, statistics from the ID training split only):

- PCA to ``pca_dim`` (768) when the feature dimension is larger: projection on the leading eigenvectors of the
  uncentred second-moment matrix (scikit-learn ``EmpiricalCovariance(assume_centered=True)``), no centring;
- variants (our choice of list): ``"raw"``; ``"standardize"``, ``(x - mean) / (std + 1e-8)`` per dimension
  (population std, as the official ``-norm`` flag); ``"l2"``, ``sqrt(d) x / ||x||`` (L2-normalised, scaled so that
  dimensions have unit scale like the other variants; a constant factor that does not change rankings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_methods.datamodules.base import EpochShuffleSampler, collate_dict, training_sampler
from lightning_methods.utils import safe_torch_load, sharded_loader

Variant = Literal["raw", "standardize", "l2"]
VARIANTS = ("raw", "standardize", "l2")


@dataclass
class EmbeddingSet:
    """Per-sample features of one dataset split, sorted by ``index``.

    Attributes:
        features: float tensor (N, d).
        index: int64 sample ids (N,) (positions in the source split).
        targets: int64 labels (N,) (-1 when the set has none).
        logits: classifier logits (N, C) when the encoder is a classifier, else ``None``.
    """

    features: torch.Tensor
    index: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.features)
        if self.features.ndim != 2:
            raise ValueError(f"features must be (N, d), got {tuple(self.features.shape)}")
        for name in ("index", "targets", "logits"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} feature rows")

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def subset(self, positions: torch.Tensor) -> EmbeddingSet:
        """Rows at ``positions`` (not sample ids)."""
        logits = None if self.logits is None else self.logits[positions]
        return EmbeddingSet(self.features[positions], self.index[positions], self.targets[positions], logits)

    def to_dict(self) -> dict[str, torch.Tensor]:
        out = {"features": self.features, "index": self.index, "targets": self.targets}
        if self.logits is not None:
            out["logits"] = self.logits
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, torch.Tensor]) -> EmbeddingSet:
        return cls(data["features"], data["index"], data["targets"], data.get("logits"))


class FeaturePreprocessor:
    """PCA + one normalisation variant, fitted on ID-train features (see the module docstring).

    Args:
        variant: ``"raw"``, ``"standardize"`` or ``"l2"``.
        pca_dim: target dimension of the PCA (applied only when features are wider); ``None`` disables it.
    """

    def __init__(self, variant: Variant = "raw", pca_dim: int | None = 768) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown normalisation variant {variant!r}; choose one of {VARIANTS}")
        if pca_dim is not None and pca_dim < 1:
            raise ValueError(f"pca_dim must be positive or None, got {pca_dim}")
        self.variant, self.pca_dim = variant, pca_dim
        self.projection: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.in_dim: int | None = None

    def fit(self, train: torch.Tensor) -> FeaturePreprocessor:
        """Fit the PCA and the variant's statistics on ID-train features (N, d)."""
        x = train.double()
        self.in_dim = x.shape[1]
        if self.pca_dim is not None and x.shape[1] > self.pca_dim:
            second_moment = x.T @ x / len(x)
            evals, evecs = torch.linalg.eigh(second_moment)
            order = torch.argsort(evals, descending=True)[: self.pca_dim]
            self.projection = evecs[:, order].contiguous()
            x = x @ self.projection
        self.mean, self.std = x.mean(dim=0), x.std(dim=0, unbiased=False)
        return self

    @property
    def out_dim(self) -> int:
        if self.in_dim is None:
            raise RuntimeError("FeaturePreprocessor is not fitted")
        return self.in_dim if self.projection is None else self.projection.shape[1]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Transform features (N, d_in) -> float32 (N, out_dim).

        Raises:
            RuntimeError: not fitted.
            ValueError: the feature dimension differs from the fitted one.
        """
        if self.in_dim is None or self.mean is None:
            raise RuntimeError("FeaturePreprocessor is not fitted: call fit() on the ID training features first")
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"features of shape {tuple(features.shape)} do not match the encoder's dimension "
                             f"{self.in_dim} that the preprocessing was fitted on")
        x = features.double()
        if self.projection is not None:
            x = x @ self.projection.to(x.device)
        if self.variant == "standardize":
            x = (x - self.mean.to(x.device)) / (self.std.to(x.device) + 1e-8)
        elif self.variant == "l2":
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * x.shape[1] ** 0.5
        return x.float()

    def state_dict(self) -> dict:
        return {"variant": self.variant, "pca_dim": self.pca_dim, "projection": self.projection, "mean": self.mean,
                "std": self.std, "in_dim": self.in_dim}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> FeaturePreprocessor:
        pre = cls(state["variant"], state["pca_dim"])
        pre.projection, pre.mean, pre.std = state["projection"], state["mean"], state["std"]
        pre.in_dim = state["in_dim"]
        return pre


class _FeatureDataset(Dataset):
    def __init__(self, features: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                 context: torch.Tensor | None) -> None:
        self.tensors = {"feature": features, "index": index, "target": targets}
        if context is not None:
            self.tensors["context"] = context

    def __len__(self) -> int:
        return len(self.tensors["feature"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        pos = torch.as_tensor(idx)
        return {k: v[pos] for k, v in self.tensors.items()}


def context_labels(logits: torch.Tensor | None) -> torch.Tensor:
    """The conditional RDM's context: ``1 + argmax`` of the classifier logits (float), as in the RDM code.

    Raises:
        ValueError: no logits (the encoder is not a classifier).
    """
    if logits is None:
        raise ValueError("a conditional RDM needs classifier logits; this encoder has none (use conditional=False)")
    return (1 + logits.argmax(dim=1)).float()


class EmbeddingDataModule(LightningDataModule):
    """Feature batches ``{"feature", "index", "target", ["context"]}`` for :class:`RDMModule`.

    Args:
        train_path: feature file (``EmbeddingSet.to_dict()`` saved with ``torch.save``) of the RDM training split.
        val_path: optional feature file for validation (DSM loss).
        predict_paths: feature files to score (one predict dataloader each).
        variant: normalisation variant (``"raw"``, ``"standardize"``, ``"l2"``).
        pca_dim: PCA dimension (768; applied when wider; ``None`` disables).
        conditional: add the ``"context"`` entry from the stored logits (conditional RDM).
        batch_size: training batch size (4096 in the RDM code).
        eval_batch_size: batch size of validation and scoring (default ``batch_size``).
        num_workers: DataLoader workers (features are small: 0 is usually fastest).
        seed: seed of the shuffling (epoch order from ``(seed, epoch)``).
        num_classes: classes of the conditional RDM's context (``lightning-methods fit`` links it to
            ``model.init_args.num_classes``); ``None`` for the unconditional RDM.
    """

    def __init__(self, train_path: str | None = None, val_path: str | None = None,
                 predict_paths: list[str] | None = None, variant: Variant = "raw", pca_dim: int | None = 768,
                 conditional: bool = False, batch_size: int = 4096, eval_batch_size: int | None = None,
                 num_workers: int = 0, seed: int = 0, num_classes: int | None = None) -> None:
        super().__init__()
        self.preprocessor = FeaturePreprocessor(variant, pca_dim)
        self.train_path, self.val_path = train_path, val_path
        self.predict_paths = list(predict_paths or [])
        self.conditional = conditional
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.sets: dict[str, EmbeddingSet] = {}
        self.predict_names: list[str] = []
        self.num_classes = num_classes

    @classmethod
    def from_sets(cls, train: EmbeddingSet, predict: Mapping[str, EmbeddingSet] | None = None,
                  preprocessor: FeaturePreprocessor | None = None, **kwargs) -> EmbeddingDataModule:
        """Build from in-memory feature sets (the pipeline's way); ``preprocessor`` may be already fitted."""
        dm = cls(**kwargs)
        if preprocessor is not None:
            dm.preprocessor = preprocessor
        dm.sets = {"train": train, **{f"predict/{k}": v for k, v in (predict or {}).items()}}
        dm.predict_names = list(predict or {})
        return dm

    def setup(self, stage: str | None = None) -> None:
        if not self.sets:
            if self.train_path is None:
                raise ValueError("EmbeddingDataModule needs train_path (the ID training features)")
            self.sets["train"] = load_feature_file(self.train_path)
            if self.val_path:
                self.sets["val"] = load_feature_file(self.val_path)
            for path in self.predict_paths:
                self.sets[f"predict/{Path(path).stem}"] = load_feature_file(path)
                self.predict_names.append(Path(path).stem)
        if self.preprocessor.in_dim is None:
            self.preprocessor.fit(self.sets["train"].features)

    @property
    def feature_dim(self) -> int:
        return self.preprocessor.out_dim

    def dataset(self, name: str) -> _FeatureDataset:
        fs = self.sets[name]
        context = context_labels(fs.logits) if self.conditional else None
        return _FeatureDataset(self.preprocessor(fs.features), fs.index.long(), fs.targets.long(), context)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        sampler = training_sampler(EpochShuffleSampler(len(ds), self.seed), self.trainer)  # a resume's epoch
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate_dict)

    def val_dataloader(self) -> DataLoader:
        return sharded_loader(self.dataset("val" if "val" in self.sets else "train"), self.eval_batch_size,
                              self.num_workers, collate_fn=collate_dict)

    def predict_dataloader(self) -> list[DataLoader]:
        """One unshuffled loader per predict set, sharded by rank with padding (gather the outputs by index with
        :class:`lightning_methods.callbacks.GatherPredictions`)."""
        return [sharded_loader(self.dataset(f"predict/{n}"), self.eval_batch_size, self.num_workers,
                               collate_fn=collate_dict) for n in self.predict_names]


#: the entries every feature file holds (``logits`` is optional)
FEATURE_FILE_KEYS = ("features", "index", "targets")


def load_feature_file(path: str | Path) -> EmbeddingSet:
    """A feature file written by the embedding cache (``weights_only`` load).

    Raises:
        FileNotFoundError / ValueError: missing or unreadable file, or not a feature file.
    """
    data = safe_torch_load(path, what="feature file")
    if not isinstance(data, dict) or "features" not in data:
        raise ValueError(f"{path} is not a feature file of lightning_methods.ood (no 'features' entry)")
    missing = [key for key in FEATURE_FILE_KEYS if key not in data]
    if missing:
        raise ValueError(f"feature file {path} lacks {missing} (it has {sorted(data)}): a feature file is a dict "
                         "{'features': float (N, d), 'index': int64 (N,) unique sample ids, 'targets': int64 (N,) "
                         "labels, optional 'logits': (N, C)}, as EmbeddingSet.to_dict gives (torch.save it)")
    return EmbeddingSet.from_dict(data)
