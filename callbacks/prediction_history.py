"""Per-sample prediction history and learning-time (FkL) selection during training.

Used by Early Cutting (Yuan et al., "Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy
Examples", arXiv 2502.08227) and its base selection: after every training epoch past the warm-up the callback predicts
every training sample (sharded over ranks, gathered with ``all_gather`` and deduplicated by ``"index"``, since the
distributed sampler pads), updates vectorized learning-time counters (see :mod:`lightning_methods.selection`) and,
with ``keep_rate``, stops training at the first epoch where the selection reaches ``int(keep_rate * n)`` samples.
Every rank holds the same history; the state is saved in checkpoints.

Attach it to any LightningModule whose ``forward(images)`` returns logits (or pass ``predict_fn``), trained with an
:class:`~lightning_methods.datamodules.ImageDataModule` (or pass ``dataloader_fn``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import Dataset

from lightning_methods.datamodules.base import IndexedTensorDataset, collate_dict
from lightning_methods.datamodules.transforms import model_input
from lightning_methods.noisy_labels.selection import (
    fkl_order,
    init_learning_state,
    should_stop,
    stop_threshold,
    update_learning_state,
)
from lightning_methods.utils.distributed import gather_by_index, sharded_loader
from lightning_methods.utils.seeding import seeded_generator

PredictFn = Callable[[LightningModule, dict[str, torch.Tensor]], torch.Tensor]


def prepare_images(batch: dict[str, torch.Tensor], datamodule: Any, augment: bool,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch's images as model input, with the DataModule's crop / flip when ``augment`` (``model_input``)."""
    return model_input(batch["image"], datamodule, augment=augment, generator=generator)


def limited(loader: Iterable, trainer: Trainer) -> Iterable:
    """One batch under ``fast_dev_run`` (smoke tests), the whole loader otherwise."""
    for i, batch in enumerate(loader):
        if trainer.fast_dev_run and i >= 1:
            return
        yield batch


class _EpochKeyed(Dataset):
    """``dataset[(i, epoch)]`` for position ``i``: an :class:`IndexedTensorDataset` then seeds its per-sample transform
    (AutoAugment, colour jitter: CPU, global RNG) from ``(seed, epoch, index)``, so a resumed run or another worker
    count draws the same augmentation."""

    def __init__(self, dataset: IndexedTensorDataset, epoch: int) -> None:
        self.dataset, self.epoch = dataset, int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.dataset[(i, self.epoch)]


class PredictionHistoryCallback(Callback):
    """Learning-time selection from per-epoch predictions on the training set.

    Args:
        warm_up_epochs: epochs with 0-based index ``<= warm_up_epochs`` are not recorded (paper code: 6).
        k: consecutive recorded epochs with the same prediction, equal to the noisy label (paper code: 3).
        keep_rate: stop rule: stop at the first epoch whose selection has ``>= int(keep_rate * n)`` samples
            (``remove_rate`` in the official code, e.g. 0.84). ``None``: record only, never stop.
        lag: the selection at the end of epoch ``e`` uses records of epochs ``<= e - lag`` (official: 1).
        history_transform: predict training samples with the training augmentation (``"train"``, official quirk,
            seeded per epoch) or without (``"eval"``).
        batch_size: batch size of the prediction pass (default: the DataModule's ``eval_batch_size``).
        stop_training: set ``trainer.should_stop`` when the stop rule fires.
        store_predictions: also keep the full N x epochs prediction matrix (for analysis; grows every epoch).
        seed: seed of the augmentation of the prediction pass.
        predict_fn: ``(pl_module, batch) -> logits``; default ``pl_module(batch["image"])``.
        dataloader_fn: ``trainer -> iterable of batches`` with ``image`` / ``target`` / ``index`` (prepared images or
            uint8); default: the DataModule's ``train_set``, sharded over ranks.
    """

    def __init__(
        self,
        warm_up_epochs: int = 6,
        k: int = 3,
        keep_rate: float | None = None,
        lag: int = 1,
        history_transform: Literal["train", "eval"] = "train",
        batch_size: int | None = None,
        stop_training: bool = True,
        store_predictions: bool = False,
        seed: int = 0,
        predict_fn: PredictFn | None = None,
        dataloader_fn: Callable[[Trainer], Iterable] | None = None,
    ) -> None:
        if k < 1 or warm_up_epochs < -1 or lag < 0:
            raise ValueError("need k >= 1, warm_up_epochs >= -1 and lag >= 0")
        if keep_rate is not None and not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        if history_transform not in ("train", "eval"):
            raise ValueError(f"history_transform must be 'train' or 'eval', got {history_transform!r}")
        self.warm_up_epochs, self.k, self.keep_rate, self.lag = warm_up_epochs, k, keep_rate, lag
        self.history_transform, self.batch_size = history_transform, batch_size
        self.stop_training, self.store_predictions, self.seed = stop_training, store_predictions, seed
        self.predict_fn, self.dataloader_fn = predict_fn, dataloader_fn
        self.reset()

    def reset(self) -> None:
        self.indices: torch.Tensor | None = None  # sorted base indices of the training set
        self.targets: torch.Tensor | None = None
        self.clean_targets: torch.Tensor | None = None
        self.counters: dict[str, torch.Tensor] = {}
        self.recorded_epochs: list[int] = []
        self.stop_epoch: int | None = None
        self.selection: torch.Tensor | None = None  # ordered base indices at the stop epoch
        self.epoch_stats: list[dict[str, float]] = []
        self.predictions: list[torch.Tensor] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(warm_up_epochs=self.warm_up_epochs, k=self.k)

    # --------------------------------------------------------------------------------------- selection
    @property
    def first_epoch(self) -> torch.Tensor | None:
        return self.counters.get("first_epoch")

    def current_selection(self, upto_epoch: int | None = None) -> torch.Tensor:
        """Ordered base indices learned at an epoch ``<= upto_epoch`` (all recorded epochs if None)."""
        if self.indices is None:
            return torch.empty(0, dtype=torch.long)
        return fkl_order(self.counters["first_epoch"], self.indices, upto_epoch)

    def update(self, epoch: int, index: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor,
               clean_targets: torch.Tensor | None = None) -> dict[str, float]:
        """Add the predictions of one epoch (any order; one entry per training sample) and apply the stop rule."""
        order = torch.argsort(index)
        index, preds, targets = index[order].cpu(), preds[order].cpu(), targets[order].cpu()
        if self.indices is None:
            self.indices, self.targets = index, targets
            self.clean_targets = None if clean_targets is None else clean_targets[order].cpu()
            self.counters = init_learning_state(len(index))
        elif not torch.equal(index, self.indices):
            raise RuntimeError("the training set changed within a selection round (the history covers "
                               f"{len(self.indices)} samples, this epoch {len(index)}); use a fresh callback per round")
        new = update_learning_state(self.counters, preds, self.targets, epoch, self.k)
        self.recorded_epochs.append(epoch)
        if self.store_predictions:
            self.predictions.append(preds.to(torch.int16 if preds.max() < 2**15 else torch.long))
        selection = self.current_selection(epoch - self.lag)
        stats = {"epoch": float(epoch), "train_agreement": (preds == self.targets).float().mean().item(),
                 "newly_learned": float(new.sum()), "selection_size": float(len(selection))}
        threshold = stop_threshold(len(self.indices), self.keep_rate) if self.keep_rate is not None else None
        if threshold is not None:
            stats["threshold"] = float(threshold)
        if self.clean_targets is not None:
            pos = torch.searchsorted(self.indices, selection)
            stats["selection_mislabeled"] = float((self.targets[pos] != self.clean_targets[pos]).sum())
        self.epoch_stats.append(stats)
        if threshold is not None and self.stop_epoch is None and should_stop(len(selection), threshold):
            self.stop_epoch, self.selection = epoch, selection
        return stats

    # --------------------------------------------------------------------------------------- prediction pass
    def _batches(self, trainer: Trainer, epoch: int) -> Iterable:
        if self.dataloader_fn is not None:
            return self.dataloader_fn(trainer)
        dm = trainer.datamodule
        ds = getattr(dm, "train_set", None)
        if not isinstance(ds, IndexedTensorDataset):
            raise RuntimeError("PredictionHistoryCallback needs an ImageDataModule (with train_set) or dataloader_fn")
        transform = ds.transform if self.history_transform == "train" else None
        ds = IndexedTensorDataset(ds.images, ds.targets, ds.indices, transform, ds.extras, seed=self.seed)
        bs = self.batch_size or getattr(dm, "eval_batch_size", 256)
        return sharded_loader(
            ds if transform is None else _EpochKeyed(ds, epoch),
            bs,
            getattr(dm, "num_workers", 0) if transform is not None else 0,
            collate_fn=collate_dict,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
        )

    @torch.no_grad()
    def predict_training_set(self, trainer: Trainer, pl_module: LightningModule, epoch: int
                             ) -> tuple[torch.Tensor, ...]:
        """``(index, prediction, target, clean_target or None)`` of every training sample, identical on all ranks."""
        device = pl_module.device
        gen = seeded_generator(self.seed, epoch, device=device)
        was_training = pl_module.training
        pl_module.eval()
        out: dict[str, list[torch.Tensor]] = {"index": [], "pred": [], "target": [], "clean": []}
        has_clean = False
        try:
            for batch in limited(self._batches(trainer, epoch), trainer):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                batch["image"] = prepare_images(batch, trainer.datamodule, self.history_transform == "train", gen)
                with trainer.strategy.precision_plugin.forward_context():
                    logits = self.predict_fn(pl_module, batch) if self.predict_fn else pl_module(batch["image"])
                out["index"].append(batch["index"])
                out["pred"].append(logits.argmax(-1))
                out["target"].append(batch["target"])
                out["clean"].append(batch.get("clean_target", batch["target"]))
                has_clean = "clean_target" in batch
        finally:
            pl_module.train(was_training)
        index, pred, target, clean = gather_by_index(*(torch.cat(v) for v in out.values()))
        return index, pred, target, clean if has_clean else None

    # --------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a fit resumed after the stop rule fired (its checkpoint holds stop_epoch) trains no further epoch, as the
        # uninterrupted fit did not: Lightning does not save trainer.should_stop
        if self.stop_epoch is not None and self.stop_training:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch <= self.warm_up_epochs or epoch in self.recorded_epochs:
            return
        stats = self.update(epoch, *self.predict_training_set(trainer, pl_module, epoch))
        for key, value in stats.items():
            if key != "epoch":
                pl_module.log(f"history/{key}", value, on_epoch=True, batch_size=1, sync_dist=True)
        if self.stop_epoch is not None and self.stop_training:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"indices": self.indices, "targets": self.targets, "clean_targets": self.clean_targets,
                "counters": dict(self.counters), "recorded_epochs": list(self.recorded_epochs),
                "stop_epoch": self.stop_epoch, "selection": self.selection, "epoch_stats": list(self.epoch_stats),
                "predictions": list(self.predictions)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reset()
        for key, value in state_dict.items():
            setattr(self, key, value)
