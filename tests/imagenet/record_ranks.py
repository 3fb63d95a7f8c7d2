"""A callback for the launcher tests: each process writes ``rank<global rank>.json`` with its place in the job
(global / node / local rank, world size, node count, Lightning's cluster environment) and the sample indices it
trained and validated on, epoch by epoch (imported by the CLI of the launched processes: ``--trainer.callbacks+=
record_ranks.RecordRanks``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


class RecordRanks(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.train: list[list[int]] = []
        self.val: list[list[int]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train.append([])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        self.train[-1] += batch["index"].tolist()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val.append([])

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self.val[-1] += batch["index"].tolist()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "global_rank": trainer.global_rank, "node_rank": trainer.node_rank, "local_rank": trainer.local_rank,
            "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "train": self.train, "val": self.val}))
