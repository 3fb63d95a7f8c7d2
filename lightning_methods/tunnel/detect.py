"""Where the tunnel starts, and how strongly it hurts out-of-distribution transfer.

Masarczyk et al., *The Tunnel Effect*, NeurIPS 2023, arXiv 2305.19753, define the tunnel qualitatively: the layers
where linear-probe accuracy saturates and the representation rank collapses. The package fixes an operational
definition (our choice, always reported next to the value):

- **tunnel start** = the first layer ``l*`` (0-based index into the probe points) whose probe accuracy reaches
  ``threshold * max_l acc(l)``, threshold 0.95: on ``[0.3, 0.6, 0.8, 0.9, 0.9, 0.9]`` the bar is 0.855 and
  ``l* = 3``, the first point of the plateau;
- **elbow** (alternative) = the layer with the most negative second difference of the accuracy curve
  ``acc(l+1) - 2 acc(l) + acc(l-1)`` (the sharpest bend; ties go to the earliest layer);
- **OOD retained** (Harun et al., *What Variables Affect Out-of-Distribution Generalization in Pretrained Models?*,
  NeurIPS 2024, arXiv 2405.15018) = ``100 * acc_ood(last layer) / max_l acc_ood(l)``, binned as negligible
  (>= 95%), weak [90, 95), medium [80, 90) and strong (< 80%) tunnel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

TUNNEL_START_DEFINITION = "first layer with probe accuracy >= {threshold} x the best layer's accuracy"


def _finite(values: Sequence[float], what: str) -> list[float]:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError(f"{what} is empty")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{what} has non-finite values: {vals}")
    return vals


def tunnel_start(accuracy: Sequence[float], threshold: float = 0.95) -> int:
    """0-based index of the first layer with ``accuracy >= threshold * max(accuracy)``.

    Raises:
        ValueError: empty or non-finite accuracies, or a threshold outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    acc = _finite(accuracy, "accuracy")
    bar = threshold * max(acc)
    return next(i for i, a in enumerate(acc) if a >= bar - 1e-12 * abs(bar))


def elbow(accuracy: Sequence[float]) -> int | None:
    """0-based index of the most negative second difference of the curve (None for fewer than 3 layers)."""
    acc = _finite(accuracy, "accuracy")
    if len(acc) < 3:
        return None
    second = [acc[i + 1] - 2 * acc[i] + acc[i - 1] for i in range(1, len(acc) - 1)]
    low = min(second)
    return 1 + next(i for i, s in enumerate(second) if s <= low + 1e-12)


def ood_retained(ood_accuracy: Sequence[float]) -> float:
    """Percentage of the best layer's OOD accuracy that the last layer keeps."""
    acc = _finite(ood_accuracy, "OOD accuracy")
    best = max(acc)
    return 100.0 * acc[-1] / best if best > 0 else float("nan")


def tunnel_strength(retained_pct: float) -> str:
    """Harun et al.'s bins of the OOD performance retained: negligible / weak / medium / strong."""
    if not math.isfinite(retained_pct):
        return "undefined"
    if retained_pct >= 95.0:
        return "negligible"
    if retained_pct >= 90.0:
        return "weak"
    return "medium" if retained_pct >= 80.0 else "strong"
