"""Logit distillation losses: KD, and its exact split into TCKD and NCKD (DKD), with an optional top-k mask.

- Hinton, Vinyals, Dean. *Distilling the Knowledge in a Neural Network*. arXiv 1503.02531.
- Zhao et al. *Decoupled Knowledge Distillation*. CVPR 2022, arXiv 2203.08679 (TCKD, NCKD, DKD).
- Huang et al. *DeepKD: A Deeply Decoupled and Denoised Knowledge Distillation Trainer*. arXiv 2505.15133 (the
  dynamic top-k mask over non-target classes).

With p = softmax(z / T), b = [p_y, 1 - p_y] and p_hat = softmax over the classes other than y, per sample:
``KD = T^2 KL(p^t || p^s)``, ``TCKD = T^2 KL(b^t || b^s)``, ``NCKD = T^2 KL(p_hat^t || p_hat^s)`` and exactly
``KD = TCKD + (1 - p^t_y) NCKD``. Every function takes ``reduction="mean"`` (sum over classes and batch divided by
the batch size, i.e. ``batchmean``) or ``"none"`` (one value per sample).

Numerics: everything is computed in float32 (float64 stays float64) from log-probabilities. Masked classes get
``-inf`` logits before ``log_softmax`` and are dropped from the KL sum, so no ``log(0)`` or ``0 * inf`` is ever
formed (the official code's ``log`` of summed probabilities and ``- 1000 * mask`` trick are not used), and the
gradient at a masked class is exactly zero.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "none"]


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): ``(z - mean) / (std + eps)`` per sample (unbiased std)."""
    return (logits - logits.mean(-1, keepdim=True)) / (logits.std(-1, keepdim=True) + eps)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 logits are upcast to float32 (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _reduce(per_sample: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None) -> None:
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"student and teacher logits must both be (batch, classes), got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if student.shape[1] < 2:
        raise ValueError("distillation losses need at least 2 classes")
    if target is not None and target.shape != student.shape[:1]:
        raise ValueError(f"target must be (batch,) int64 class indices, got shape {tuple(target.shape)}")


def _kl_rows(log_p_t: torch.Tensor, log_p_s: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j p_t[j] (log p_t[j] - log p_s[j]) over the kept classes of every row."""
    if keep is not None:
        log_p_t = log_p_t.masked_fill(~keep, 0.0)
        log_p_s = log_p_s.masked_fill(~keep, 0.0)
    terms = log_p_t.exp() * (log_p_t - log_p_s)
    if keep is not None:
        terms = terms.masked_fill(~keep, 0.0)
    return terms.sum(-1)


def _masked_log_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log_softmax over the kept classes of each row (rows with no kept class give finite values, later dropped)."""
    masked = logits.masked_fill(~keep, float("-inf"))
    masked = masked.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return F.log_softmax(masked, dim=-1)


def target_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, classes) mask, True at the target class."""
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, target.view(-1, 1), True)


def topk_keep_mask(teacher_logits: torch.Tensor, target: torch.Tensor, k: int | None) -> torch.Tensor:
    """Non-target classes that NCKD keeps: the teacher's top-``k`` classes over *all* classes, minus the target
    (DeepKD's dynamic top-k mask; if y is in the teacher's top-k only k - 1 non-target classes survive).
    ``k`` of ``None``, ``<= 0`` or ``>= num_classes`` keeps every non-target class (plain NCKD)."""
    not_target = ~target_mask(teacher_logits, target)
    num_classes = teacher_logits.shape[1]
    if k is None or k <= 0 or k >= num_classes:
        return not_target
    top = teacher_logits.topk(int(k), dim=1).indices
    in_top = torch.zeros_like(not_target).scatter_(1, top, True)
    return in_top & not_target


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            reduction: Reduction = "mean") -> torch.Tensor:
    """Hinton KD: ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``.

    Args:
        student_logits: (B, C) student logits (gradients flow into these).
        teacher_logits: (B, C) teacher logits.
        temperature: softmax temperature T.
        reduction: ``"mean"`` (batchmean) or ``"none"`` (per sample).
    """
    _check(student_logits, teacher_logits)
    t = float(temperature)
    log_p_s = F.log_softmax(_fp32(student_logits) / t, dim=-1)
    log_p_t = F.log_softmax(_fp32(teacher_logits) / t, dim=-1)
    return _reduce(_kl_rows(log_p_t, log_p_s) * t * t, reduction)


def _binary_log_probs(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(B, 2) log [p_y, 1 - p_y] computed with log-sum-exp (finite even when p_y rounds to 1)."""
    log_z = torch.logsumexp(logits, dim=-1)
    log_target = (logits.masked_fill(~gt, float("-inf"))).logsumexp(-1) - log_z
    log_rest = (logits.masked_fill(gt, float("-inf"))).logsumexp(-1) - log_z
    return torch.stack([log_target, log_rest], dim=-1)


def tckd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float = 4.0, reduction: Reduction = "mean") -> torch.Tensor:
    """Target-class KD: ``T^2 KL(b_t || b_s)`` with ``b = [p_y, 1 - p_y]`` (DKD, Eq. 3)."""
    _check(student_logits, teacher_logits, target)
    t = float(temperature)
    gt = target_mask(student_logits, target)
    log_b_s = _binary_log_probs(_fp32(student_logits) / t, gt)
    log_b_t = _binary_log_probs(_fp32(teacher_logits) / t, gt)
    return _reduce(_kl_rows(log_b_t, log_b_s) * t * t, reduction)


def nckd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float = 4.0, topk: int | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    """Non-target-class KD: ``T^2 KL(p_hat_t || p_hat_s)`` over the classes other than y (DKD, Eq. 3).

    Args:
        topk: if given (0 < k < C), keep only the teacher's top-k classes (minus y) in both distributions (DeepKD's
            mask); classes outside get exactly zero gradient. ``None``, ``0`` or ``k >= C`` give plain NCKD.
    """
    _check(student_logits, teacher_logits, target)
    t = float(temperature)
    keep = topk_keep_mask(teacher_logits.detach(), target, topk)
    log_q_s = _masked_log_softmax(_fp32(student_logits) / t, keep)
    log_q_t = _masked_log_softmax(_fp32(teacher_logits) / t, keep)
    return _reduce(_kl_rows(log_q_t, log_q_s, keep) * t * t, reduction)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0, topk: int | None = None,
             reduction: Reduction = "mean") -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (without the CE term and the warm-up factor).

    Args:
        alpha: weight of TCKD (1.0 in DKD).
        beta: weight of NCKD (per teacher/student pair, 8.0 for resnet32x4 -> resnet8x4).
        topk: optional DeepKD top-k mask for NCKD (see :func:`nckd_loss`).
    """
    tc = tckd_loss(student_logits, teacher_logits, target, temperature, "none")
    nc = nckd_loss(student_logits, teacher_logits, target, temperature, topk=topk, reduction="none")
    return _reduce(alpha * tc + beta * nc, reduction)


def teacher_target_prob(teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``p^t_y`` at temperature T, per sample (the factor of NCKD in the KD decomposition is ``1 - p^t_y``)."""
    return F.softmax(_fp32(teacher_logits) / float(temperature), dim=-1).gather(1, target.view(-1, 1)).squeeze(1)
