"""DeepKD's dynamic top-k mask (DTM) schedule for the non-target classes of NCKD.

Huang et al. *DeepKD: A Deeply Decoupled and Denoised Knowledge Distillation Trainer*. NeurIPS 2025,
arXiv 2505.15133. The paper grows k from 5% of the classes to all classes in an easy -> transition -> hard
curriculum, so low-confidence "noisy dark knowledge" is dropped early; it gives no exact phase boundaries, and the
released code ships no schedule (top-k off). This callback implements a configurable three-phase schedule, set at
every epoch start (0-indexed epoch e)::

    k(e) = k0                                        for e < start_epoch
    k(e) = round(k0 + (C - k0) (e - e1) / (e2 - e1)) for start_epoch <= e < end_epoch
    k(e) = C                                         for e >= end_epoch

with defaults k0 = ceil(0.05 C), e1 = 20 (end of the DKD warm-up), e2 = 150 (first learning-rate decay). k = C
reproduces plain NCKD exactly. The module must have an integer attribute ``topk`` (DistillationClassifier).
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class TopKScheduleCallback(Callback):
    """Sets ``pl_module.topk`` at every training epoch start.

    Args:
        start_fraction: k0 as a fraction of the classes (rounded up), used when ``start_k`` is not given.
        start_k: k0 as a number of classes (overrides ``start_fraction``).
        start_epoch: e1, the last epoch of the easy phase plus one (the linear growth starts here).
        end_epoch: e2, the first epoch with all classes.
    """

    def __init__(self, start_fraction: float = 0.05, start_k: int | None = None, start_epoch: int = 20,
                 end_epoch: int = 150) -> None:
        if not 0.0 < start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}")
        if start_k is not None and start_k < 1:
            raise ValueError(f"start_k must be >= 1, got {start_k}")
        if not 0 <= start_epoch <= end_epoch:
            raise ValueError(f"need 0 <= start_epoch <= end_epoch, got {start_epoch} and {end_epoch}")
        self.start_fraction = start_fraction
        self.start_k = start_k
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.k: int | None = None  # the value set at the last epoch start

    def initial_k(self, num_classes: int) -> int:
        k0 = self.start_k if self.start_k is not None else math.ceil(self.start_fraction * num_classes)
        return min(max(int(k0), 1), num_classes)

    def k_at(self, epoch: int, num_classes: int) -> int:
        """k for the 0-indexed ``epoch`` with ``num_classes`` classes."""
        k0 = self.initial_k(num_classes)
        if epoch >= self.end_epoch:
            return num_classes
        if epoch < self.start_epoch:
            return k0
        frac = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return min(num_classes, int(round(k0 + (num_classes - k0) * frac)))

    def _apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not hasattr(pl_module, "topk"):
            raise TypeError("TopKScheduleCallback needs a module with a 'topk' attribute (DistillationClassifier), "
                            f"got {type(pl_module).__name__}")
        self.k = self.k_at(trainer.current_epoch, int(pl_module.num_classes))
        pl_module.topk = self.k

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "start_fraction": self.start_fraction, "start_k": self.start_k,
                "start_epoch": self.start_epoch, "end_epoch": self.end_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the schedule's arguments come from the (possibly edited) config; only the current k is restored
        self.k = state_dict.get("k")
