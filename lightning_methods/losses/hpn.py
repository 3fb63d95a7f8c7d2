"""Squared-cosine losses and predictions of Hyperspherical Prototype Networks (pure functions).

Mettes, van der Pol, Snoek. *Hyperspherical Prototype Networks*. NeurIPS 2019, arXiv 1901.10514 (sections 2.1-2.3;
the task weight ``t`` of the multi-task loss from the authors' response).

With network output ``o`` (no normalisation layer; cosines normalise it), fixed unit prototypes ``p_k`` and the
cosine eps 1e-9 of the official code:

- classification: ``L_c = sum_i (1 - cos(o_i, p_{y_i}))^2``; prediction ``argmax_k <o / |o|, p_k>``;
- regression with the antipodal poles ``+-p_u`` (``p_u = e_1``): the target ``y`` in training bounds
  ``(v_l, v_u)`` maps to ``r = 2 (y - v_l) / (v_u - v_l) - 1``; ``L_r = sum_i (r_i - cos(o_i, p_u))^2``;
  prediction ``v_l + (cos(o, p_u) + 1) / 2 (v_u - v_l)``, always inside ``[v_l, v_u]``;
- multi-task (one output, official OmniArt split): ``L_m = t L_c + (1 - t) L_r``, the regression cosine on the whole
  ``o``, the classification cosine on ``o[reg_dim:]``.

``reduction="sum"`` (official; lr 0.01 is tuned for it), ``"mean"`` or ``"none"`` (one value per sample). All
arithmetic is float32 (float64 stays float64) whatever the autocast dtype of ``o``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["sum", "mean", "none"]
COSINE_EPS = 1e-9


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _reduce(per_sample: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def _check_output(output: torch.Tensor, dims: int, what: str) -> None:
    if output.ndim != 2 or output.shape[1] != dims:
        raise ValueError(f"network output must be (batch, {dims}) to match the {what}, got {tuple(output.shape)}; "
                         f"the backbone's last layer must output {dims} values")


def prototype_cosines(output: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, K) cosines ``<o / |o|, p_k>`` to every (unit) prototype: the scores ("logits") for top-1 / top-5."""
    _check_output(output, prototypes.shape[1], "prototypes")
    out = _fp32(output)
    return F.normalize(out, p=2, dim=1) @ prototypes.to(out.dtype).t()


def predict_class(output: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Nearest prototype in cosine (invariant to positive rescaling of ``output``)."""
    return prototype_cosines(output, prototypes).argmax(dim=1)


def hpn_classification_loss(output: torch.Tensor, prototypes: torch.Tensor, target: torch.Tensor,
                            reduction: Reduction = "sum", eps: float = COSINE_EPS) -> torch.Tensor:
    """``L_c = sum_i (1 - cos(o_i, p_{y_i}))^2``.

    Args:
        output: (B, D) network outputs.
        prototypes: (K, D) fixed class prototypes.
        target: (B,) int64 class indices.
        reduction: ``"sum"`` (official), ``"mean"`` or ``"none"``.
        eps: cosine eps (official 1e-9).

    Raises:
        ValueError: shapes that do not match.
    """
    _check_output(output, prototypes.shape[1], "prototypes")
    if target.shape != output.shape[:1]:
        raise ValueError(f"target must be (batch,) class indices, got shape {tuple(target.shape)}")
    out = _fp32(output)
    cos = F.cosine_similarity(out, prototypes.to(out.dtype)[target], dim=1, eps=eps)
    return _reduce((1 - cos).pow(2), reduction)


def check_bounds(lower: float, upper: float) -> None:
    """Raise unless ``lower < upper`` are finite."""
    if not (torch.isfinite(torch.tensor([lower, upper])).all() and lower < upper):
        raise ValueError(f"regression bounds must be finite with lower < upper, got ({lower}, {upper})")


def regression_cosine_target(value: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """``r = 2 (y - v_l) / (v_u - v_l) - 1``: ``v_l -> -1``, ``v_u -> +1`` (outside the bounds: outside [-1, 1])."""
    check_bounds(lower, upper)
    return 2.0 * ((_fp32(value) - lower) / (upper - lower)) - 1


def regression_prediction(cos_upper: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """``v_l + (cos + 1) / 2 (v_u - v_l)``, the inverse of :func:`regression_cosine_target` on [-1, 1]."""
    check_bounds(lower, upper)
    return (cos_upper + 1) / 2.0 * (upper - lower) + lower


def upper_pole_cosine(output: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """``cos(o, e_1)`` for every row of ``o`` (the official ``CosineSimilarity`` against the upper prototype)."""
    if output.ndim != 2 or output.shape[1] < 2:
        raise ValueError(f"regression output must be (batch, D) with D >= 2, got {tuple(output.shape)}")
    out = _fp32(output)
    pole = torch.zeros_like(out[:1])
    pole[0, 0] = 1
    return F.cosine_similarity(out, pole.expand_as(out), dim=1, eps=eps)


def cosine_regression_loss(output: torch.Tensor, cos_target: torch.Tensor, reduction: Reduction = "sum",
                           eps: float = COSINE_EPS) -> torch.Tensor:
    """``L_r = sum_i (r_i - cos(o_i, e_1))^2`` for targets ``r`` already mapped by :func:`regression_cosine_target`.

    Args:
        output: (B, D) network outputs, D >= 2.
        cos_target: (B,) targets in [-1, 1].
        reduction: ``"sum"`` (official), ``"mean"`` or ``"none"``.
        eps: cosine eps.
    """
    if cos_target.shape != output.shape[:1]:
        raise ValueError(f"regression target must be (batch,), got {tuple(cos_target.shape)}")
    return _reduce((_fp32(cos_target) - upper_pole_cosine(output, eps)).pow(2), reduction)


def check_task_weight(task_weight: float) -> None:
    """Raise unless ``0 <= t <= 1``."""
    if not 0.0 <= task_weight <= 1.0:
        raise ValueError(f"task_weight t must be in [0, 1] (L_m = t L_c + (1 - t) L_r), got {task_weight}")


def multitask_loss(output: torch.Tensor, prototypes: torch.Tensor, target: torch.Tensor, cos_target: torch.Tensor,
                   task_weight: float = 0.5, reg_dim: int = 1, reduction: Reduction = "sum",
                   eps: float = COSINE_EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L_m = t L_c + (1 - t) L_r`` on one output ``o`` of ``reg_dim + D_c`` values.

    Args:
        output: (B, reg_dim + D_c) network outputs.
        prototypes: (K, D_c) class prototypes, matched against ``o[:, reg_dim:]``.
        target: (B,) class indices.
        cos_target: (B,) regression targets mapped to [-1, 1], matched against ``cos(o, e_1)`` on the whole ``o``.
        task_weight: ``t`` in [0, 1] (official default 0.5; 0.25 reported best).
        reg_dim: leading output values kept out of the classification cosine (official 1).
        reduction: ``"sum"`` (official), ``"mean"`` or ``"none"``.
        eps: cosine eps.

    Returns:
        ``(L_m, L_c, L_r)``, each reduced as asked.
    """
    check_task_weight(task_weight)
    if reg_dim < 1:
        raise ValueError(f"reg_dim must be >= 1 (the regression pole e_1 lies in the first {reg_dim} values)")
    _check_output(output, reg_dim + prototypes.shape[1], f"reg_dim + prototype dims = {reg_dim} + "
                                                          f"{prototypes.shape[1]}")
    loss_c = hpn_classification_loss(output[:, reg_dim:], prototypes, target, "none", eps)
    loss_r = cosine_regression_loss(output, cos_target, "none", eps)
    loss_m = task_weight * loss_c + (1 - task_weight) * loss_r
    return _reduce(loss_m, reduction), _reduce(loss_c, reduction), _reduce(loss_r, reduction)
