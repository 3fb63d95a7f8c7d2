"""Mask construction of Sparse SAM (pure functions, usable without Lightning).

Mi et al., *Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach*, NeurIPS 2022,
arXiv 2210.05177 (official code Mi-Peng/Sparse-Sharpness-Aware-Minimization).

- SSAM-F: empirical Fisher ``F_j = sum_n (d loss(x_n, y_n) / d w_j)^2`` over single training samples, then a global
  top-k over all masked parameters concatenated (no per-layer quota).
- SSAM-D: drop the lowest-scoring live entries and grow as many dead ones, with the cosine death-rate schedule
  ``dr(e) = drop_rate * (1 + cos(pi * (e - T_start) / (T_end - T_start))) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.parameters import frozen_bn_stats

#: Offset added to scores before masking, as in the official code (keeps zero-score live entries selectable).
SCORE_OFFSET = 1e-7


def global_topk_mask(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks (shapes of ``scores``) that are True at the ``k`` largest entries of all scores together."""
    if not scores:
        return []
    device = scores[0].device
    flat = torch.cat([s.detach().reshape(-1).float().to(device) for s in scores])
    k = max(0, min(int(k), flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    out, start = [], 0
    for s in scores:
        out.append(mask[start : start + s.numel()].view(s.shape).to(s.device))
        start += s.numel()
    return out


def death_rate(epoch: float, drop_rate: float, t_end: float, t_start: float = 0.0) -> float:
    """SSAM-D cosine death rate: ``drop_rate`` at ``t_start``, ``drop_rate / 2`` half-way, 0 at ``t_end``."""
    if t_end <= t_start:
        raise ValueError(f"t_end ({t_end}) must be > t_start ({t_start})")
    return drop_rate * (1.0 + math.cos(math.pi * (epoch - t_start) / (t_end - t_start))) / 2.0


def drop_grow_counts(d: int, sparsity: float, rate: float) -> tuple[int, int]:
    """SSAM-D ``(survivors, grown)`` for ``d`` entries: ``int((d - d s) (1 - rate))`` and ``int(min((d - d s) rate,
    d s))``, evaluated in exactly this order as in the official code (``int((1 - s) d (1 - rate))`` rounds differently:
    99 instead of 100 survivors at ``d = 1000, s = 0.9, rate = 0``)."""
    live = d - d * sparsity
    return int(live * (1.0 - rate)), int(min(live * rate, d * sparsity))


def drop_and_grow(
    masks: Sequence[torch.Tensor],
    drop_scores: Sequence[torch.Tensor],
    grow_scores: Sequence[torch.Tensor],
    sparsity: float,
    rate: float,
) -> list[torch.Tensor]:
    """One SSAM-D update: keep the top :func:`drop_grow_counts` ``[0]`` live entries by ``drop_scores`` and grow the
    top ``[1]`` dead entries by ``grow_scores``; the density stays about ``1 - s``.

    Survivors are a subset of the old mask and grown entries are disjoint from it.
    """
    d = sum(m.numel() for m in masks)
    live = [(s.float() + SCORE_OFFSET) * m for s, m in zip(drop_scores, masks)]
    dead = [(s.float() + SCORE_OFFSET) * ~m for s, m in zip(grow_scores, masks)]
    keep, grow = drop_grow_counts(d, sparsity, rate)
    survivors = global_topk_mask(live, keep)
    grown = global_topk_mask(dead, grow)
    return [(a & m) | (b & ~m) for a, b, m in zip(survivors, grown, masks)]


def fisher_scores(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Empirical Fisher diagonal ``sum_n grad_n ** 2`` of ``params`` (fp32), one backward pass per item of ``samples``.

    Args:
        model: maps inputs to logits; its mode is kept (the official code scores in train mode). BatchNorm running
            statistics are left untouched (``frozen_bn_stats``).
        params: the tensors to score (gradients via ``torch.autograd.grad``: ``.grad`` fields are not touched).
        samples: ``(inputs, targets)`` pairs, each one sample (batch size 1) for the exact per-sample Fisher.
        loss_fn: ``(logits, targets) -> scalar``; default cross-entropy against the true labels.
    """
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits.float(), y))
    scores = [torch.zeros_like(q, dtype=torch.float32) for q in params]
    with frozen_bn_stats(model), torch.enable_grad():
        for inputs, targets in samples:
            loss = loss_fn(model(inputs), targets)
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for f, g in zip(scores, grads):
                if g is not None:
                    f.add_(g.detach().float().square())
    return scores
