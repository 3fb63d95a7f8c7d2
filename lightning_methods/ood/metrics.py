"""OOD detection metrics with OpenOOD's conventions (Zhang et al., "OpenOOD v1.5: Enhanced Benchmark for
Out-of-Distribution Detection", arXiv 2306.09301; code Jingkang50/OpenOOD, ``openood/evaluators/metrics.py``).

``conf`` is an ID-confidence (higher = more in-distribution). Curves follow scikit-learn's ``roc_curve`` (with its
``drop_intermediate`` rule) and ``precision_recall_curve``; areas are trapezoids (``sklearn.metrics.auc``), as
OpenOOD computes them: AUPR is the trapezoidal area under the PR curve, not average precision.

- AUROC: ranking of ID above OOD (ties count one half); the same whichever class is called positive.
- AUPR-In: ID positive, score ``conf``. AUPR-Out: OOD positive, score ``-conf``.
- FPR@95, ``convention="v1.5"`` (default; the tagged OpenOOD v1.5 release and the classic definition): ID positive,
  the threshold keeps 95% of the ID samples, FPR = fraction of OOD samples accepted. ``convention="head"`` (OpenOOD
  after August 2023, "OOD as positive"): the threshold flags 95% of the OOD samples, FPR = fraction of ID samples
  flagged. Both are pinned in tests against the two OpenOOD revisions.

Results are fractions in ``[0, 1]``; tables print them x100 like OpenOOD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

Convention = Literal["v1.5", "head"]
METRIC_NAMES = ("auroc", "fpr95", "aupr_in", "aupr_out")

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy < 2 names the same rule trapz


def _scores(conf_id: object, conf_ood: object) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(conf_id, dtype=np.float64).reshape(-1)
    b = np.asarray(conf_ood, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"OOD metrics need ID and OOD samples, got {a.size} ID and {b.size} OOD scores")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("OOD metrics got non-finite confidences (NaN or inf); check the scores of this detector")
    return a, b


def binary_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives, threshold) at each distinct score, highest threshold first
    (a sample is predicted positive when its score is >= the threshold)."""
    score = np.concatenate([pos, neg])
    label = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-score, kind="mergesort")
    score, label = score[order], label[order]
    last = np.r_[np.nonzero(np.diff(score))[0], score.size - 1]  # last position of each distinct score
    tps = np.cumsum(label)[last]
    fps = 1.0 + last - tps
    return fps, tps, score[last]


def roc_curve(pos: object, neg: object, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of positives ``pos`` against negatives ``neg``, starting at ``(0, 0)``; collinear interior
    points are dropped like scikit-learn's ``roc_curve`` (which changes the FPR read off at a TPR only with ties)."""
    fps, tps, _ = binary_curve(*_scores(pos, neg))
    if drop_intermediate and fps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]


def auroc(conf_id: object, conf_ood: object) -> float:
    """Area under the ROC curve, ID ranked above OOD."""
    fpr, tpr = roc_curve(conf_id, conf_ood)
    return float(_trapezoid(tpr, fpr))


def fpr_at_tpr(conf_id: object, conf_ood: object, tpr: float = 0.95, convention: Convention = "v1.5") -> float:
    """False positive rate at the first ROC point whose true positive rate reaches ``tpr`` (see the module
    docstring for the two conventions)."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    a, b = _scores(conf_id, conf_ood)
    if convention == "v1.5":
        fpr_list, tpr_list = roc_curve(a, b)
    elif convention == "head":
        fpr_list, tpr_list = roc_curve(-b, -a)
    else:
        raise ValueError(f"unknown FPR convention {convention!r}; choose 'v1.5' or 'head'")
    return float(fpr_list[np.argmax(tpr_list >= tpr)])


def aupr(pos: object, neg: object) -> float:
    """Trapezoidal area under the precision-recall curve of positives ``pos`` (scikit-learn's curve, which ends at
    recall 0 with precision 1)."""
    fps, tps, _ = binary_curve(*_scores(pos, neg))
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(_trapezoid(np.r_[1.0, precision], np.r_[0.0, recall]))


def ood_metrics(conf_id: object, conf_ood: object, convention: Convention = "v1.5",
                tpr: float = 0.95) -> dict[str, float]:
    """``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` for one ID/OOD pair (fractions).

    Args:
        conf_id: ID-confidences of the ID test samples (higher = more ID).
        conf_ood: ID-confidences of one OOD set.
        convention: FPR@95 convention (``"v1.5"`` or ``"head"``).
        tpr: the recall level of the FPR metric (0.95).
    """
    a, b = _scores(conf_id, conf_ood)
    return {"auroc": auroc(a, b), "fpr95": fpr_at_tpr(a, b, tpr, convention), "aupr_in": aupr(a, b),
            "aupr_out": aupr(-b, -a)}


def group_means(per_dataset: Mapping[str, Mapping[str, float]], groups: Mapping[str, str]) -> dict[str, dict]:
    """Mean of every metric over the datasets of each group (OpenOOD's near / far averages).

    Args:
        per_dataset: ``{dataset: {metric: value}}``.
        groups: ``{dataset: group}`` (e.g. ``"near"``, ``"far"``, ``"covariate"``); datasets without a group are
            left out of the means.

    Raises:
        KeyError: a grouped dataset has no metrics.
    """
    out: dict[str, dict] = {}
    for group in dict.fromkeys(groups.values()):
        names = [n for n, g in groups.items() if g == group]
        missing = [n for n in names if n not in per_dataset]
        if missing:
            raise KeyError(f"group {group!r} lists datasets without metrics: {missing}")
        out[group] = {m: float(np.mean([per_dataset[n][m] for n in names])) for m in per_dataset[names[0]]}
    return out
