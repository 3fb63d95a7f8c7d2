"""ID-only encoder diagnostics of EncMin2L (Bhuyan, arXiv 2605.20502): eta^2 for semantic sensitivity, Delta-mu for
covariate sensitivity, and the encoder subset chosen from them. Definitions are standard statistics matching the
paper's description (our choice; the paper's exact formulas are not available).

- eta^2: one-way ANOVA of a per-sample quantity grouped by class, ``SS_between / SS_total`` in ``[0, 1]``; with
  ``F = [SS_b / (C - 1)] / [SS_w / (N - C)]`` the identity ``eta^2 = F (C - 1) / (F (C - 1) + N - C)`` holds. For
  feature matrices (N, d) the sums of squares are summed over dimensions (the trace form).
- Delta-mu: ``mean_ID(s) - mean_corrupt(ID)(s)`` of the log-likelihood under a synthetic corruption, optionally
  divided by ``std_ID(s)``. Larger = more covariate-sensitive.
- Subset selection (the paper's rule is not specified): ``"top1_union"`` keeps the best encoder by eta^2 and the best
  by Delta-mu (default), ``"topk_union"`` the best ``k`` of each, ``"all"`` every encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

Selection = Literal["top1_union", "topk_union", "all"]


def anova(values: object, labels: object) -> dict[str, float]:
    """One-way ANOVA of ``values`` (N,) or (N, d) grouped by ``labels`` (N,).

    Returns:
        ``{"ss_between", "ss_within", "ss_total", "f", "eta2", "n", "classes"}``; ``f`` is ``inf`` without
        within-class variance, ``eta2`` is 0 when every sample is equal.

    Raises:
        ValueError: shape mismatch, fewer than two classes, or no more samples than classes.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x.reshape(len(x), -1) if x.ndim != 1 else x[:, None]
    y = np.asarray(labels).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"anova: {len(x)} values but {len(y)} labels")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    n, c = len(y), len(classes)
    if c < 2 or n <= c:
        raise ValueError(f"anova needs at least two classes and more samples than classes, got N={n}, C={c}")
    grand = x.mean(axis=0)
    means = np.zeros((c, x.shape[1]))
    np.add.at(means, inverse, x)
    means /= counts[:, None]
    ss_between = float(np.sum(counts[:, None] * (means - grand) ** 2))
    ss_within = float(np.sum((x - means[inverse]) ** 2))
    ss_total = float(np.sum((x - grand) ** 2))
    f = (ss_between / (c - 1)) / (ss_within / (n - c)) if ss_within > 0 else float("inf")
    eta2 = ss_between / ss_total if ss_total > 0 else 0.0
    return {"ss_between": ss_between, "ss_within": ss_within, "ss_total": ss_total, "f": f, "eta2": eta2,
            "n": n, "classes": c}


def eta_squared(values: object, labels: object) -> float:
    """``SS_between / SS_total`` of ``values`` grouped by ``labels`` (see :func:`anova`)."""
    return anova(values, labels)["eta2"]


def eta_squared_from_f(f: float, n: int, classes: int) -> float:
    """The identity ``eta^2 = F (C - 1) / (F (C - 1) + N - C)``."""
    if np.isinf(f):
        return 1.0
    return f * (classes - 1) / (f * (classes - 1) + n - classes)


def delta_mu(clean: object, corrupted: object, standardize: bool = False) -> float:
    """``mean(clean) - mean(corrupted)`` of per-sample log-likelihoods, divided by ``std(clean)`` if ``standardize``.

    Raises:
        ValueError: an empty input, or zero spread of ``clean`` with ``standardize``.
    """
    a = np.asarray(clean, dtype=np.float64).reshape(-1)
    b = np.asarray(corrupted, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("delta_mu needs clean and corrupted scores")
    diff = float(a.mean() - b.mean())
    if not standardize:
        return diff
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    if sd <= 0:
        raise ValueError("delta_mu(standardize=True): the clean scores have no spread")
    return diff / sd


def select_encoders(eta2: Mapping[str, float], dmu: Mapping[str, float], rule: Selection = "top1_union",
                    k: int = 1) -> list[str]:
    """Encoders kept by the diagnostics rule, in the order of ``eta2``.

    Args:
        eta2: ``{encoder: eta^2}`` (higher = more semantically sensitive).
        dmu: ``{encoder: Delta-mu}`` (higher = more covariate-sensitive).
        rule: ``"top1_union"``, ``"topk_union"`` or ``"all"``.
        k: how many encoders each criterion keeps for ``"topk_union"``.

    Raises:
        ValueError: unknown rule, or the two mappings name different encoders.
    """
    if set(eta2) != set(dmu):
        raise ValueError(f"eta2 names encoders {sorted(eta2)} but delta_mu names {sorted(dmu)}")
    if rule == "all":
        return list(eta2)
    if rule not in ("top1_union", "topk_union"):
        raise ValueError(f"unknown selection rule {rule!r}; choose 'top1_union', 'topk_union' or 'all'")
    k = 1 if rule == "top1_union" else k
    best = set(sorted(eta2, key=lambda e: -eta2[e])[:k]) | set(sorted(dmu, key=lambda e: -dmu[e])[:k])
    return [e for e in eta2 if e in best]
