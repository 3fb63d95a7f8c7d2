"""DKD: Zhao et al., *Decoupled Knowledge Distillation*, CVPR 2022, arXiv 2203.08679.

``CE + min(epoch / warmup, 1) * (alpha TCKD + beta NCKD)`` with the epoch 1-indexed (the official warm-up).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_methods.distillation.base import DistillationClassifier
from lightning_methods.losses.kd import nckd_loss, tckd_loss


class DKDClassifier(DistillationClassifier):
    """Student trained with decoupled KD (target-class and non-target-class terms) from a frozen teacher.

    Args:
        alpha: TCKD weight.
        beta: NCKD weight (per teacher/student pair in the paper).
        warmup_epochs: warm-up length: the TCKD/NCKD weight is ``min((current_epoch + 1) / warmup_epochs, 1)``.
        **kwargs: the arguments of :class:`DistillationClassifier` (``ce_weight`` defaults to 1.0) and of
            :class:`~lightning_methods.ImageClassifier`.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, warmup_epochs: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha, self.beta, self.warmup_epochs = alpha, beta, warmup_epochs

    def kd_warmup(self) -> float:
        """DKD warm-up weight ``min(epoch / warmup, 1)`` with the 1-indexed epoch."""
        w = self.warmup_epochs
        return 1.0 if w <= 0 else min((self.current_epoch + 1) / w, 1.0)

    def distillation_terms(self, logits: torch.Tensor, teacher_logits: torch.Tensor,
                           target: torch.Tensor) -> dict[str, torch.Tensor]:
        s, t = self.prepared_logits(logits, teacher_logits)
        tc = tckd_loss(s, t, target, self.temperature, "none")
        nc = nckd_loss(s, t, target, self.temperature, topk=self.nckd_topk(s.shape[1]), reduction="none")
        w = self.kd_warmup()
        return {"tckd": self.alpha * w * tc, "nckd": self.beta * w * nc}
