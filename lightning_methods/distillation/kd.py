"""KD: Hinton, Vinyals, Dean, *Distilling the Knowledge in a Neural Network*, arXiv 1503.02531.

``ce_weight * CE + kd_weight * T^2 KL(p_t^T || p_s^T)`` with mdistiller's CIFAR-100 weights 0.1 / 0.9 and T = 4.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_methods.distillation.base import DistillationClassifier
from lightning_methods.losses.kd import kd_loss, nckd_loss, tckd_loss, teacher_target_prob


class KDClassifier(DistillationClassifier):
    """Student trained with the KD loss from a frozen teacher.

    Args:
        ce_weight: weight of the cross-entropy (mdistiller: 0.1).
        kd_weight: weight of the KD term (mdistiller: 0.9).
        **kwargs: the arguments of :class:`DistillationClassifier` (``backbone``, ``teacher``,
            ``teacher_checkpoint``, ``temperature``, ...) and of :class:`~lightning_methods.ImageClassifier`.
    """

    def __init__(self, ce_weight: float = 0.1, kd_weight: float = 0.9, **kwargs: Any) -> None:
        super().__init__(ce_weight=ce_weight, **kwargs)
        self.kd_weight = kd_weight

    def distillation_terms(self, logits: torch.Tensor, teacher_logits: torch.Tensor,
                           target: torch.Tensor) -> dict[str, torch.Tensor]:
        s, t = self.prepared_logits(logits, teacher_logits)
        if self.nckd_topk(s.shape[1]) is None:
            return {"kd": self.kd_weight * kd_loss(s, t, self.temperature, "none")}
        tc, nc = self.decomposed_kd(s, t, target, batch_mean_nckd=False)
        return {"tckd": self.kd_weight * tc, "nckd": self.kd_weight * nc}

    def decomposed_kd(self, s: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                      batch_mean_nckd: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """KD split exactly as ``TCKD + (1 - p^t_y) NCKD`` (DKD's Eq. 3), per sample; NCKD over the top-k classes
        when a top-k is set. ``batch_mean_nckd``: the official DeepKD form ``mean(1 - p^t_y) * mean(NCKD)``."""
        tc = tckd_loss(s, t, target, self.temperature, "none")
        nc = nckd_loss(s, t, target, self.temperature, topk=self.nckd_topk(s.shape[1]), reduction="none")
        one_minus_p = 1.0 - teacher_target_prob(t, target, self.temperature)
        if batch_mean_nckd:
            return tc, one_minus_p.mean() * nc.mean().expand_as(nc)
        return tc, one_minus_p * nc
