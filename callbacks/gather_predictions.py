"""GatherPredictions: per-sample ``predict_step`` outputs of every rank, gathered and deduplicated by sample index.

A ``predict_step`` returns a dict of per-sample tensors with an ``"index"`` entry. Under DDP each rank sees a shard
(a padding ``DistributedSampler`` repeats samples to equalise the shards); at the end of the predict epoch this
callback gathers every dataloader's outputs from all ranks and keeps one row per index, sorted
(:func:`lightning_methods.utils.gather_by_index`). ``results[dataloader_idx]`` then holds the same CPU tensors on every
rank. A rank that got no batch of a dataloader (a shard shorter than the world size, a custom sampler; Lightning
allows it with ``allow_zero_length_dataloader_with_multiple_devices``) contributes an empty shard
(:func:`lightning_methods.utils.gather_columns`). (A rank that has no batch of *any* dataloader never reaches this
callback: Lightning skips its predict loop.) Used by the OOD family's embedding and scoring stages (EncMin2L,
arXiv 2605.20502).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_methods.utils import gather_columns


class GatherPredictions(Callback):
    """Collect and gather per-sample predictions (see the module docstring).

    Args:
        keys: output entries to keep (default: all); ``"index"`` is always kept.

    Raises:
        KeyError: a ``predict_step`` output without ``"index"``.
        RuntimeError: a dataloader that yielded no batch on any rank, or ranks whose outputs have different entries,
            dtypes or per-sample shapes (raised on every rank alike).
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
            local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None
            self.results[idx] = gather_columns(local, pl_module.device, f"predict dataloader {idx}")
        self._parts = defaultdict(list)

