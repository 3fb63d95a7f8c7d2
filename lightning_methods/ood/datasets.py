"""Image sets of the EncMin2L pipeline: the ID splits, the OOD sets and the corrupted ID sets of the Delta-mu
diagnostic, each with a fingerprint (its spec and the SHA-256 of its pixels and labels) that keys the embedding
cache; and the seeded, disjoint ``rdm_train`` / ``calib_1`` / ``calib_2`` split of the ID fit split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_methods.datamodules.corruptions import corrupt
from lightning_methods.datamodules.covariate_shift import datamodule_split
from lightning_methods.hparams import import_path
from lightning_methods.ood.cache import content_hash
from lightning_methods.ood.config import IDConfig, OODSetConfig
from lightning_methods.runs import NEUTRAL_KEYS
from lightning_methods.utils import seeded_generator

NEUTRAL_DATA_KEYS = NEUTRAL_KEYS | {"batch_size", "eval_batch_size", "cache", "gpu_resident", "augment"}


@dataclass
class ImageSet:
    """uint8 images with labels, sample ids and a fingerprint."""

    name: str
    images: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    fingerprint: dict[str, Any]


def instantiate_datamodule(spec: dict[str, Any], what: str) -> Any:
    """``class_path(**init_args)`` of a DataModule spec.

    Raises:
        ValueError: a spec without ``class_path`` or a class path that cannot be imported.
    """
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{what}: data must be a dict with 'class_path' (and 'init_args'), got {spec!r}")
    try:
        cls = import_path(spec["class_path"])
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what}: cannot import data class {spec['class_path']!r} ({err})") from err
    return cls(**(spec.get("init_args") or {}))


def data_identity(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a DataModule spec that define its images (paths, workers and batch sizes removed)."""
    if spec is None:
        return None
    args = {k: v for k, v in (spec.get("init_args") or {}).items() if k not in NEUTRAL_DATA_KEYS}
    return {"class_path": spec["class_path"], "init_args": args}


def subsample(n: int, limit: int | None, seed: int, key: int) -> torch.Tensor | None:
    """Sorted seeded positions of at most ``limit`` of ``n`` items (``None`` when nothing is dropped)."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=seeded_generator(seed, key))[:limit].sort().values


def make_set(name: str, images: torch.Tensor, targets: torch.Tensor, index: torch.Tensor,
             spec: dict[str, Any]) -> ImageSet:
    fingerprint = {**spec, "samples": len(images), "content_sha256": content_hash(images, targets, index)}
    return ImageSet(name, images, targets.long(), index.long(), fingerprint)


def load_id_sets(cfg: IDConfig, seed: int) -> tuple[Any, dict[str, ImageSet]]:
    """The ID DataModule and its image sets ``{"fit", "test"[, "calib"]}`` (class filter and relabelling applied).

    Raises:
        ValueError: bad data spec or split names.
    """
    dm = instantiate_datamodule(cfg.data, f"id '{cfg.name}'")
    base = {"data": data_identity(cfg.data)}
    sets = {}
    for role, split, limit in (("fit", cfg.fit_split, None), ("test", cfg.test_split, cfg.max_test_samples),
                               ("calib", cfg.calib_split, None)):
        if split is None:
            continue
        images, targets, index = datamodule_split(dm, split)
        if cfg.classes is not None:
            chosen = torch.isin(targets, torch.tensor(cfg.classes))
            relabel = {c: i for i, c in enumerate(cfg.classes)}
            images, index = images[chosen], index[chosen]
            targets = torch.tensor([relabel[int(t)] for t in targets[chosen]], dtype=torch.int64)
        keep = subsample(len(images), limit, seed, 17)
        if keep is not None:
            images, targets, index = images[keep], targets[keep], index[keep]
        if len(images) == 0:
            raise ValueError(f"id '{cfg.name}': split {split!r} has no images of the classes {cfg.classes}")
        sets[role] = make_set(f"{cfg.name}_{role}", images, targets, index,
                              {**base, "split": split, "classes": cfg.classes, "max_samples": limit,
                               "seed": seed if keep is not None else None})
    return dm, sets


def load_ood_set(spec: OODSetConfig, id_cfg: IDConfig, id_dm: Any, seed: int) -> ImageSet:
    """One OOD set (class filter, seeded subsample, on-the-fly corruption).

    Raises:
        ValueError: bad data spec or split, or a filter that leaves no image.
    """
    dm = id_dm if spec.data is None else instantiate_datamodule(spec.data, f"ood set '{spec.name}'")
    images, targets, index = datamodule_split(dm, spec.split)
    keep = torch.ones(len(targets), dtype=torch.bool)
    if spec.classes is not None:
        keep &= torch.isin(targets, torch.tensor(spec.classes))
    if spec.exclude_classes is not None:
        keep &= ~torch.isin(targets, torch.tensor(spec.exclude_classes))
    images, targets, index = images[keep], targets[keep], index[keep]
    pos = subsample(len(images), spec.max_samples, seed, 31)
    if pos is not None:
        images, targets, index = images[pos], targets[pos], index[pos]
    if len(images) == 0:
        raise ValueError(f"ood set '{spec.name}' is empty after its class filter ({spec.classes} / "
                         f"{spec.exclude_classes}) and subsampling")
    if spec.corruption:
        images = corrupt(images, spec.corruption, spec.severity, spec.corruption_seed, index)
    fp = {"data": data_identity(spec.data if spec.data is not None else id_cfg.data), "split": spec.split,
          "classes": spec.classes, "exclude_classes": spec.exclude_classes, "max_samples": spec.max_samples,
          "seed": seed if pos is not None else None,
          "corruption": [spec.corruption, spec.severity, spec.corruption_seed] if spec.corruption else None}
    return make_set(spec.name, images, targets, index, fp)


def corrupted_set(base: ImageSet, corruption: str, severity: int, seed: int) -> ImageSet:
    """A corrupted copy of an image set (for the Delta-mu diagnostic)."""
    images = corrupt(base.images, corruption, severity, seed, base.index)
    fp = {**{k: v for k, v in base.fingerprint.items() if k not in ("content_sha256", "samples")},
          "corruption": [corruption, severity, seed]}
    return make_set(f"{base.name}_{corruption}{severity}", images, base.targets, base.index, fp)


def calibration_split(index: torch.Tensor, fractions: list[float], seed: int) -> dict[str, torch.Tensor]:
    """Seeded disjoint ``rdm_train`` / ``calib_1`` / ``calib_2`` sample ids from the ids of the ID fit split.

    Raises:
        ValueError: fractions that are not two values in (0, 1) summing below 1, or a split left empty.
    """
    if len(fractions) != 2 or min(fractions) <= 0 or sum(fractions) >= 1:
        raise ValueError(f"calib_fractions must be two fractions in (0, 1) with a sum below 1, got {fractions}")
    perm = index[torch.randperm(len(index), generator=seeded_generator(seed, 7))]
    n1, n2 = (round(f * len(index)) for f in fractions)
    out = {"calib_1": perm[:n1], "calib_2": perm[n1 : n1 + n2], "rdm_train": perm[n1 + n2 :]}
    empty = [k for k, v in out.items() if len(v) == 0]
    if empty:
        raise ValueError(f"the ID fit split of {len(index)} samples leaves {empty} empty with fractions {fractions}")
    return {k: v.sort().values for k, v in out.items()}


def check_disjoint(train: torch.Tensor, calibration: dict[str, torch.Tensor], same_source: bool = True) -> None:
    """Calibration sets must not share samples with the RDM training split (nor with each other).

    Args:
        train: sample ids of the RDM training split.
        calibration: ``{"calib_1": ids, "calib_2": ids}``.
        same_source: whether the ids index the same split (otherwise they cannot overlap).

    Raises:
        ValueError: overlapping ids, with their count and how to fix the config.
    """
    if not same_source:
        return
    named = {"rdm_train": train, **calibration}
    names = list(named)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = torch.isin(named[a], named[b]).sum().item()
            if both:
                raise ValueError(f"calibration splits overlap the RDM training split: {both} samples are in both "
                                 f"'{a}' and '{b}'. Calibration data must be held-out ID data: use calib_fractions "
                                 "of the fit split, or a calib_split other than the fit split")
