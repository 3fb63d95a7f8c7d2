"""Learning-time sample selection and Early Cutting, as pure tensor functions.

Yuan, Feng, Han, Liu, "Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy Examples" (Early
Cutting, NeurIPS 2025, arXiv 2502.08227; official code tmllab/2025_NeurIPS_MEE).

**Learning time (FkL, "first k-epoch learning").** After a warm-up, a sample counts as learned at epoch ``e`` when
its prediction equals its (noisy) label at ``e`` and the prediction was the same in the ``k - 1`` previous recorded
epochs (``k = 3`` in the paper's runs). The selection is every learned sample, ordered by the epoch it was first
learned. Per-sample counters make one update per epoch O(N) (the official code recounts the whole history).

**Early Cutting.** The earliest-learned part of the selection is re-examined with a *later* model state (the best
noisy-validation checkpoint): among its highest-loss samples, those with high confidence and a low input-gradient
norm are Mislabeled Easy Examples and are removed from the selection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------- learning time


def init_learning_state(num_samples: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Counters of :func:`update_learning_state`: last prediction, length of the current run of equal
    predictions, and the first epoch the sample was learned (-1: not yet)."""
    return {
        "prev_pred": torch.full((num_samples,), -1, dtype=torch.long, device=device),
        "streak": torch.zeros(num_samples, dtype=torch.long, device=device),
        "first_epoch": torch.full((num_samples,), -1, dtype=torch.long, device=device),
    }


def update_learning_state(state: dict[str, torch.Tensor], preds: torch.Tensor, targets: torch.Tensor, epoch: int,
                          k: int = 3) -> torch.Tensor:
    """Add one recorded epoch (in place) and return the mask of samples learned for the first time.

    A sample is learned at ``epoch`` when ``pred == target`` and the last ``k`` recorded predictions are equal
    (the current one included); records must be passed for consecutive epochs after the warm-up.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    same = preds == state["prev_pred"]
    state["streak"] = torch.where(same, state["streak"] + 1, torch.ones_like(state["streak"]))
    state["prev_pred"] = preds.clone()
    learned = (preds == targets) & (state["streak"] >= k)
    new = learned & (state["first_epoch"] < 0)
    state["first_epoch"] = torch.where(new, torch.full_like(state["first_epoch"], epoch), state["first_epoch"])
    return new


def learning_epochs(preds: torch.Tensor, targets: torch.Tensor, warm_up_epochs: int = 6, k: int = 3) -> torch.Tensor:
    """First-learned epoch of every sample from a full history ``preds`` (N x E, column = 0-based epoch).

    Epochs ``<= warm_up_epochs`` are ignored. Returns -1 for samples never learned.
    """
    state = init_learning_state(preds.shape[0], preds.device)
    for e in range(warm_up_epochs + 1, preds.shape[1]):
        update_learning_state(state, preds[:, e], targets, e, k)
    return state["first_epoch"]


def fkl_order(first_epoch: torch.Tensor, indices: torch.Tensor, upto_epoch: int | None = None) -> torch.Tensor:
    """Base indices of the samples learned at an epoch ``<= upto_epoch`` (all if None), ordered by first-learned
    epoch; ties by base index (the official code breaks them by the position in its shuffled 45k array)."""
    learned = first_epoch >= 0
    if upto_epoch is not None:
        learned &= first_epoch <= upto_epoch
    idx, ep = indices[learned], first_epoch[learned]
    by_index = torch.argsort(idx, stable=True)
    by_epoch = torch.argsort(ep[by_index], stable=True)
    return idx[by_index][by_epoch]


def stop_threshold(num_train: int, keep_rate: float) -> int:
    """Round-stop threshold ``int(keep_rate * n)`` (``keep_rate`` is called ``remove_rate`` in the official code)."""
    return int(num_train * keep_rate)


def should_stop(num_selected: int, threshold: int) -> bool:
    """The official stop rule: a non-empty selection of at least ``threshold`` samples."""
    return num_selected > 0 and num_selected >= threshold


def simulate_selection_round(preds: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, keep_rate: float,
                             warm_up_epochs: int = 6, k: int = 3, lag: int = 1) -> tuple[int | None, torch.Tensor]:
    """Replay a selection round on a full history (N x E): returns ``(stop_epoch, ordered selection)``.

    At the end of epoch ``e`` the selection holds the samples learned at epochs ``<= e - lag`` (official: ``lag=1``,
    the records of epochs ``< e``); the round stops at the first ``e`` where :func:`should_stop` holds. When it never
    stops, returns ``(None, selection at the last epoch)``.
    """
    state = init_learning_state(preds.shape[0], preds.device)
    threshold = stop_threshold(len(indices), keep_rate)
    for e in range(preds.shape[1]):
        if e > warm_up_epochs:
            update_learning_state(state, preds[:, e], targets, e, k)
        selection = fkl_order(state["first_epoch"], indices, e - lag)
        if should_stop(len(selection), threshold):
            return e, selection
    return None, fkl_order(state["first_epoch"], indices, preds.shape[1] - 1 - lag)


# ----------------------------------------------------------------------------------------------- early cutting


@dataclass
class CutResult:
    """Outcome of :func:`early_cut` (all tensors hold base indices)."""

    selected: torch.Tensor  # FkL order kept, MEEs removed
    removed: torch.Tensor  # the MEEs, in FkL order
    subset: torch.Tensor  # earliest-learned part that was re-examined
    candidates: torch.Tensor  # highest-loss samples of the subset


def cut_subset(fkl: torch.Tensor, cutting_rate: float = 1.5) -> torch.Tensor:
    """The first ``max(1, min(int(|FkL| / cutting_rate), |FkL|))`` entries of the ordered selection."""
    if cutting_rate <= 0:
        raise ValueError(f"cutting_rate must be > 0, got {cutting_rate}")
    if len(fkl) == 0:
        return fkl
    return fkl[: max(1, min(int(len(fkl) / cutting_rate), len(fkl)))]


def loss_candidates(subset: torch.Tensor, loss: torch.Tensor, loss_select: Literal["count", "quantile"] = "count",
                    num_candidates: int = 3000, loss_quantile: float = 0.1) -> torch.Tensor:
    """The highest-loss samples of ``subset`` (``loss`` aligned with it): ``num_candidates`` of them (official) or the
    top ``loss_quantile`` fraction, ``int(loss_quantile * |subset|)`` (paper)."""
    if loss_select == "count":
        n = min(num_candidates, len(subset))
    elif loss_select == "quantile":
        n = int(loss_quantile * len(subset))
    else:
        raise ValueError(f"loss_select must be 'count' or 'quantile', got {loss_select!r}")
    if n <= 0:
        return subset[:0]
    order = torch.argsort(loss[: len(subset)], stable=True)
    return subset[order[len(order) - n :]]


def mee_from_candidates(candidates: torch.Tensor, confidence: torch.Tensor, grad_norm: torch.Tensor,
                        conf_quantile: float = 0.2, grad_quantile: float = 0.2) -> torch.Tensor:
    """Top ``conf_quantile`` of the candidates by confidence intersected with the bottom ``grad_quantile`` by input
    gradient norm (each at least one sample, as in the official code). Scores are aligned with ``candidates``."""
    if len(candidates) == 0:
        return candidates
    n_conf = max(1, int(len(candidates) * conf_quantile))
    n_grad = max(1, int(len(candidates) * grad_quantile))
    top_conf = torch.argsort(confidence, descending=True, stable=True)[:n_conf]
    low_grad = torch.argsort(grad_norm, descending=True, stable=True)[len(candidates) - n_grad :]
    return candidates[top_conf[torch.isin(top_conf, low_grad)]]


def early_cut(
    fkl: torch.Tensor,
    loss: torch.Tensor,
    confidence: torch.Tensor,
    grad_norm: torch.Tensor,
    cutting_rate: float = 1.5,
    loss_select: Literal["count", "quantile"] = "count",
    num_candidates: int = 3000,
    loss_quantile: float = 0.1,
    conf_quantile: float = 0.2,
    grad_quantile: float = 0.2,
) -> CutResult:
    """Early Cutting on precomputed scores (each aligned with ``fkl``; only the re-examined prefix is read).

    ``subset = fkl[:int(|fkl| / cutting_rate)]``; ``candidates`` = its highest-loss samples;
    ``MEE = top-conf(candidates) ∩ bottom-grad(candidates)``; ``selected = fkl \\ MEE`` (order kept).
    """
    subset = cut_subset(fkl, cutting_rate)
    pos = {int(i): p for p, i in enumerate(fkl.tolist())}
    cand = loss_candidates(subset, loss, loss_select, num_candidates, loss_quantile)
    cand_pos = torch.tensor([pos[int(i)] for i in cand.tolist()], dtype=torch.long)
    mee = mee_from_candidates(cand, confidence[cand_pos], grad_norm[cand_pos], conf_quantile, grad_quantile)
    return apply_cut(fkl, mee, subset, cand)


def apply_cut(fkl: torch.Tensor, mee: torch.Tensor, subset: torch.Tensor, candidates: torch.Tensor) -> CutResult:
    """Remove ``mee`` from the ordered selection ``fkl``."""
    drop = torch.isin(fkl, mee)
    return CutResult(selected=fkl[~drop], removed=fkl[drop], subset=subset, candidates=candidates)


# ----------------------------------------------------------------------------------------------- scores


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


@torch.no_grad()
def loss_and_confidence(logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                        targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy against ``targets`` and the max softmax probability (any class)."""
    logits = _at_least_fp32(logits_fn(images))
    return F.cross_entropy(logits, targets, reduction="none"), logits.softmax(-1).max(-1).values


def input_gradient_norms(logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """``|| d CE(f(x_i), y_i) / d x_i ||_2`` per sample, w.r.t. the (normalized) input tensor.

    The summed loss gives every sample its own gradient as long as samples do not interact (BatchNorm in eval mode:
    put the model in ``eval()`` first). Works inside ``no_grad`` / eval contexts; parameter gradients are untouched.
    """
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(_at_least_fp32(logits_fn(x)), targets, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad.flatten(1).norm(dim=1)
