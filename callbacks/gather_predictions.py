"""GatherPredictions: per-sample ``predict_step`` outputs of every rank, gathered and deduplicated by sample index.

A ``predict_step`` returns a dict of per-sample tensors with an ``"index"`` entry. Under DDP each rank sees a shard
(a padding ``DistributedSampler`` repeats samples to equalise the shards); at the end of the predict epoch this
callback gathers every dataloader's outputs from all ranks and keeps one row per index, sorted
(:func:`lightning_methods.utils.gather_by_index`). ``results[dataloader_idx]`` then holds the same CPU tensors on every
rank. Used by the OOD family's embedding and scoring stages (EncMin2L, arXiv 2605.20502).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_methods.utils import gather_by_index


class GatherPredictions(Callback):
    """Collect and gather per-sample predictions (see the module docstring).

    Args:
        keys: output entries to keep (default: all); ``"index"`` is always kept.

    Raises:
        KeyError: a ``predict_step`` output without ``"index"``.
        RuntimeError: a dataloader that yielded no batch on some rank.
    """

    def __init__(self, keys: list[str] | None = None) -> None:
        self.keys = keys
        self.results: dict[int, dict[str, torch.Tensor]] = {}
        self._parts: dict[int, list[dict[str, torch.Tensor]]] = defaultdict(list)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._parts, self.results = defaultdict(list), {}

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, dict) or "index" not in outputs:
            raise KeyError("GatherPredictions needs predict_step to return a dict with an 'index' entry")
        keys = ["index", *(k for k in (self.keys or outputs) if k != "index")]
        self._parts[dataloader_idx].append({k: outputs[k].detach() for k in keys if outputs.get(k) is not None})

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = trainer.predict_dataloaders
        count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        for idx in range(count):
            parts = self._parts.get(idx)
            if not parts:
                raise RuntimeError(f"predict dataloader {idx} yielded no batch on rank {trainer.global_rank}")
            keys = list(parts[0])
            cat = {k: torch.cat([p[k] for p in parts]) for k in keys}
            gathered = gather_by_index(cat["index"], *(cat[k] for k in keys[1:]))
            self.results[idx] = {k: v.cpu() for k, v in zip(keys, gathered)}
        self._parts = defaultdict(list)
