"""Shared DataModule machinery: uint8 tensor datasets with dict batches, seeded hold-out split, batched on-device
augmentation and an optional GPU-resident training loader.

Workers only index uint8 tensors (one ``index_select`` per batch through ``__getitems__``). The standard CIFAR
augmentation (pad-4 random crop, horizontal flip), normalization and CutMix/MixUp run batched on the training
device in ``on_after_batch_transfer``. AutoAugment runs per sample in the workers (torchvision.transforms.v2 on
uint8 tensors) before that, its draws seeded by ``(seed, epoch, index)`` (the training sampler tags each position with
its epoch).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from lightning_methods.datamodules.transforms import device_augment, mix_batch, normalize
from lightning_methods.utils.seeding import mix_seed, seeded_generator

Augment = Literal["standard", "crop", "none", "autoaugment", "colorjitter"]
_TRANSFORM_KEY = 1  # the fourth key of a worker-side transform's seed: (seed, epoch, index, 1)


class IndexedTensorDataset(Dataset):
    """Images (uint8 NCHW), targets and base indices; items are dicts ``{"image", "target", "index", ...}``.

    Args:
        images: uint8 tensor of shape (N, C, H, W).
        targets: int64 tensor of shape (N,).
        indices: int64 positions of the samples in the full source split (``"index"`` in batches).
        transform: optional per-sample transform of the uint8 CHW image (runs in workers).
        extras: further per-sample tensors of length N added to every item under their key.
        seed: seed of ``transform``'s random draws for keys ``(position, epoch)`` (a training sampler with
            ``tag_epoch=True``): they come from ``(seed, epoch, index)``, whatever the worker, the worker count or
            the global RNG (restored afterwards); a plain position draws from the global RNG.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        extras: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 NCHW tensor, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = targets.long()
        self.indices = torch.arange(len(images)) if indices is None else indices.long()
        self.transform = transform
        self.extras = extras or {}
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def _item(self, i: int | torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"image": self.images[i], "target": self.targets[i], "index": self.indices[i]}
        out.update({k: v[i] for k, v in self.extras.items()})
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        tagged = isinstance(key, (tuple, list))
        item = self._item(int(key[0]) if tagged else key)
        if self.transform is None:
            return item
        if not tagged:
            item["image"] = self.transform(item["image"])
            return item
        rng = torch.default_generator  # torchvision's transforms draw from the global CPU RNG: seed it, then restore
        state = rng.get_state()  # (torch.random.fork_rng costs three times the transform itself)
        try:
            rng.manual_seed(mix_seed(self.seed, int(key[1]), int(item["index"]), _TRANSFORM_KEY))
            item["image"] = self.transform(item["image"])
        finally:
            rng.set_state(state)
        return item

    def __getitems__(self, idx: list[Any]) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.transform is not None:
            return [self[i] for i in idx]
        pos = [int(i[0]) if isinstance(i, (tuple, list)) else i for i in idx]
        return self._item(torch.as_tensor(pos))  # already a batch: one gather per tensor


def collate_dict(items: Any) -> Any:
    """Collate that passes batches made by ``__getitems__`` through unchanged."""
    return items if isinstance(items, dict) else default_collate(items)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a function of ``(seed, epoch)`` only, so a resumed run (or another rank)
    draws exactly the same order."""
    return torch.randperm(n, generator=seeded_generator(seed, epoch))


#: Where a user sets a missing data set's folder, for the not-found messages (the same DataModule also serves a
#: callback, e.g. TunnelProbe's OOD data, and the ``ood`` command, which have no ``--data``).
DATA_DIR_HINT = ("--data.data_dir for the data of a fit; the data_dir of its entry in the config for a callback's "
                 "DataModule (e.g. --trainer.callbacks.init_args.ood_data.init_args.data_dir) or the ood command's "
                 "data sets")


def fit_start_epoch(trainer: Any) -> int:
    """The epoch a Trainer's fit loop runs first: 0, or the restored epoch on a resume (0 without a Trainer).

    A training loader's sampler must start there. Lightning creates the loader's iterator, whose DataLoader workers
    prefetch indices at once, before it calls ``set_epoch`` for the first epoch of a fit; a fresh process resumed
    from an end-of-epoch checkpoint (``--ckpt_path last``) would otherwise replay epoch 0's order and crops."""
    progress = getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None)
    return int(progress.current.processed) if progress is not None else 0


def training_sampler(sampler: Any, trainer: Any) -> Any:
    """``sampler`` (with ``set_epoch``) started in the fit's first epoch (:func:`fit_start_epoch`); under DDP already
    wrapped as Lightning would wrap it (its ``DistributedSamplerWrapper``: the order's positions shuffled by
    ``PL_GLOBAL_SEED`` and the epoch, then sharded by rank; :class:`RankShardSampler`), with the wrapper's epoch set
    too. Every rank gets ``N // world_size`` distinct positions (``drop_last=True``): Lightning's default pads the
    shards with repeats, so up to ``world_size - 1`` samples would run twice per epoch (as in
    :class:`DeviceBatchLoader`, the ``N % world_size`` positions at the end of an epoch's shuffled order wait for
    another epoch). Lightning leaves a distributed sampler alone, and would set its own wrapper's epoch only after the
    resumed fit's workers have prefetched: each rank would then read another shard of the restored epoch than the
    uninterrupted run."""
    epoch = fit_start_epoch(trainer)
    sampler.set_epoch(epoch)
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    wraps = getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True)
    if kwargs and wraps and not getattr(trainer, "overfit_batches", 0):
        sampler = RankShardSampler(sampler, shuffle=True, seed=int(os.getenv("PL_GLOBAL_SEED", 0)),
                                   **{**kwargs, "drop_last": True})
        sampler.set_epoch(epoch)
    return sampler


class RankShardSampler(DistributedSamplerWrapper):
    """Lightning's ``DistributedSamplerWrapper`` that always forwards ``set_epoch`` to the sampler it wraps (Lightning
    2.6.0's does not: there the wrapped order stayed that of the epoch the sampler started in)."""

    def __init__(self, sampler: Any, **kwargs: Any) -> None:
        super().__init__(sampler, **kwargs)
        self.wrapped = sampler

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.wrapped.set_epoch(epoch)


class EpochShuffleSampler(Sampler[int]):
    """Random order per epoch from ``(seed, epoch)`` (Lightning calls ``set_epoch``; under DDP its sampler wrapper
    shards this order and forwards ``set_epoch``). Unlike ``RandomSampler`` it does not draw from the global RNG,
    so a run resumed from a checkpoint sees the same batches as the uninterrupted run (a training loader gets it
    through :func:`training_sampler`). ``tag_epoch=True`` yields ``(position, epoch)``: the key with which an
    :class:`IndexedTensorDataset` seeds its per-sample transform (persistent workers never see ``set_epoch``)."""

    def __init__(self, n: int, seed: int = 0, tag_epoch: bool = False) -> None:
        self.n, self.seed, self.epoch, self.tag_epoch = n, seed, 0, tag_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        order = epoch_permutation(self.n, self.seed, self.epoch).tolist()
        return iter([(p, self.epoch) for p in order] if self.tag_epoch else order)


class DeviceBatchLoader:
    """Training batches sliced from a dataset held whole on the training device (no workers, no host copies).

    Every epoch draws one permutation from ``(seed, epoch)`` (identical on every rank), keeps the first
    ``world_size * (N // world_size)`` entries, gives rank ``r`` the entries ``r, r + world_size, ...`` and cuts
    those into batches. With ``drop_last`` the incomplete last batch is dropped, as for the worker loader.
    """

    def __init__(
        self,
        dataset: IndexedTensorDataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if dataset.transform is not None:
            raise ValueError("the GPU-resident loader cannot apply per-sample transforms (augment='autoaugment')")
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.tensors = {"target": dataset.targets, "index": dataset.indices, **dataset.extras}
        self.tensors = {k: v.to(self.device) for k, v in self.tensors.items()}
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sampler = EpochShuffleSampler(len(self.images), seed)  # holds the epoch Lightning sets
        self.per_rank = len(self.images) // world_size

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def rank_order(self) -> torch.Tensor:
        """Positions (into the dataset) that this rank visits this epoch, in order."""
        n = len(self.images)
        if self.shuffle:
            order = epoch_permutation(n, self.seed, self.sampler.epoch)
        else:
            order = torch.arange(n)
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.rank_order().to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = {"image": self.images.index_select(0, idx)}
            batch.update({k: v.index_select(0, idx) for k, v in self.tensors.items()})
            yield batch


class ImageDataModule(LightningDataModule):
    """Base of the image DataModules: subclasses implement :meth:`load_splits` and set ``num_classes``, ``mean``
    and ``std``.

    Args:
        batch_size: training batch size per device (the global batch is ``batch_size * devices``).
        eval_batch_size: batch size for validation/test/predict (default: ``batch_size``).
        num_workers: DataLoader worker processes (persistent).
        val_split: fraction of the training set held out for validation, seeded; 0 validates on the test set.
        augment: ``"standard"`` (pad-4 random crop + flip, batched on the device), ``"crop"`` (crop only),
            ``"none"``, ``"autoaugment"`` (CIFAR-10 AutoAugment policy per sample in workers, then crop + flip) or
            ``"colorjitter"`` (ColorJitter(0.4, 0.4, 0.4) per sample in workers, then crop + flip).
        gpu_resident: keep the whole uint8 training set on the training device and slice batches there (no
            workers); sharded by rank under DDP.
        cutmix_alpha: Beta parameter of batch CutMix (0 disables); adds ``"soft_target"`` to training batches.
        mixup_alpha: Beta parameter of batch MixUp (0 disables).
        seed: seed of the hold-out split, the GPU-resident shuffling and the mixing draws.
        pin_memory: pin host memory for faster copies (default: when CUDA is available).
    """

    num_classes: int = 0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        val_split: float = 0.0,
        augment: Augment = "standard",
        gpu_resident: bool = False,
        cutmix_alpha: float = 0.0,
        mixup_alpha: float = 0.0,
        seed: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if augment not in ("standard", "crop", "none", "autoaugment", "colorjitter"):
            raise ValueError(f"augment must be 'standard', 'crop', 'none', 'autoaugment' or 'colorjitter', got "
                             f"{augment!r}")
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_split}")
        if gpu_resident and augment in ("autoaugment", "colorjitter"):
            raise ValueError(
                f"augment={augment!r} runs per sample in DataLoader workers and cannot be combined with "
                "gpu_resident=True; use augment='standard' or gpu_resident=False"
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.augment = augment
        self.gpu_resident = gpu_resident
        self.cutmix_alpha, self.mixup_alpha = cutmix_alpha, mixup_alpha
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set: IndexedTensorDataset | None = None
        self.val_set: IndexedTensorDataset | None = None
        self.test_set: IndexedTensorDataset | None = None

    # ------------------------------------------------------------------------------------------ data
    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return ``{"train": (uint8 NCHW images, int64 targets), "test": (...)}``."""
        raise NotImplementedError

    def train_targets(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hook for subclasses that change training labels (label noise): returns ``{"target": ..., extras}``
        for the full training split, before the hold-out split."""
        return {"target": targets}

    def holdout_split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded disjoint (train, val) positions into a training split of size ``n`` (both sorted)."""
        n_val = int(round(self.val_split * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def _worker_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.augment not in ("autoaugment", "colorjitter"):
            return None
        from torchvision.transforms import v2

        if self.augment == "colorjitter":
            return v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.load_splits()
        images, clean = splits["train"]
        labels = self.train_targets(images, clean)
        target = labels.pop("target")
        train_pos, val_pos = self.holdout_split(len(images))
        base = torch.arange(len(images))

        def subset(pos: torch.Tensor, transform: Callable | None) -> IndexedTensorDataset:
            extras = {k: v[pos] for k, v in labels.items()}
            return IndexedTensorDataset(images[pos], target[pos], base[pos], transform, extras, seed=self.seed)

        self.train_set = subset(train_pos, self._worker_transform())
        test_images, test_targets = splits["test"]
        self.test_set = IndexedTensorDataset(test_images, test_targets)
        self.val_set = subset(val_pos, None) if len(val_pos) else self.test_set

    # ------------------------------------------------------------------------------------------ loaders
    def first_epoch(self) -> int:
        """The epoch the attached Trainer's fit runs first (:func:`fit_start_epoch`): where a training loader starts."""
        return fit_start_epoch(self.trainer)

    def _loader(self, dataset: IndexedTensorDataset, train: bool) -> DataLoader:
        sampler = None
        if train:  # positions tagged with the epoch where workers augment: their draws come from (seed, epoch, index)
            sampler = EpochShuffleSampler(len(dataset), self.seed, tag_epoch=dataset.transform is not None)
            sampler = training_sampler(sampler, self.trainer)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=collate_dict,
        )

    def _require(self, split: str) -> None:
        if getattr(self, split, None) is None:
            raise RuntimeError(f"{type(self).__name__}.{split} is not built yet: call setup() first (the Trainer "
                               "does this; in your own code call datamodule.setup('fit') before asking for loaders)")

    def train_dataloader(self) -> DataLoader | DeviceBatchLoader:
        self._require("train_set")
        if not self.gpu_resident:
            return self._loader(self.train_set, train=True)
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        return DeviceBatchLoader(self.train_set, self.batch_size, device, shuffle=True, drop_last=True, seed=self.seed,
                                 rank=rank, world_size=world)

    def val_dataloader(self) -> DataLoader:
        self._require("val_set")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self._require("test_set")
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # ------------------------------------------------------------------------------------------ device side
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        image = batch["image"]
        if image.dtype != torch.uint8:
            return batch
        training = self.trainer is not None and self.trainer.training
        if training:  # randomness keyed by (seed, step, rank): reproducible, resumable, different on every rank
            seed = mix_seed(self.seed, self.trainer.global_step, self.trainer.global_rank)
            image = device_augment(image, self.augment, torch.Generator(device=image.device).manual_seed(seed))
        batch["image"] = normalize(image, self.mean, self.std)
        if training and (self.cutmix_alpha > 0 or self.mixup_alpha > 0):
            rng = np.random.default_rng(seed)
            batch["image"], batch["soft_target"] = mix_batch(
                batch["image"], batch["target"], self.num_classes, cutmix_alpha=self.cutmix_alpha,
                mixup_alpha=self.mixup_alpha, rng=rng
            )
        return batch
