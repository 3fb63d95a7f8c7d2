"""ECDF p-values and the two-level min gate of EncMin2L.

Bhuyan, "Tippett-minimum Fusion of Representation-space Diffusion Models for Multi-Encoder Out-of-Distribution
Detection" (arXiv 2605.20502). Scores are oriented "higher = more in-distribution" (log-likelihoods); a p-value is
small for OOD inputs and is the ID-confidence used by the metrics.

- :func:`ecdf_pvalues`: ``p(x) = (1 + #{j : s_j <= s(x)}) / (n + 1)`` with held-out ID calibration scores ``s_j``.
- :func:`recalibrate`: maps the minimum of ``K`` p-values back to a p-value: ``"ecdf"`` (the empirical CDF of the min
  statistic on held-out ID data, distribution-free, default), ``"tippett"`` / ``"sidak"`` (both ``1 - (1 - p)^K``:
  Tippett's minimum-p test and Sidak's correction are the same map; exact only for independent p-values, conservative
  for the positively dependent p-values of several encoders), ``"bonferroni"`` (``min(1, K p)``) or ``"none"``.
- :class:`TwoLevelMinGate`: level 1 takes the minimum over normalisation variants within each encoder, level 2 the
  minimum over encoders, each recalibrated. Splits (our choice): ``calib_1`` fits the per-(encoder, variant) ECDFs,
  ``calib_2`` (disjoint from ``calib_1`` and from the RDM training split) fits both recalibrations. The level-1
  p-values of ``calib_2`` itself, which the level-2 recalibration needs, are leave-one-out p-values, so every
  calibration point is scored like a fresh ID point (a gate over identical detectors is then exactly the identity).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Recalibration = Literal["ecdf", "tippett", "sidak", "bonferroni", "none"]
RECALIBRATIONS = ("ecdf", "tippett", "sidak", "bonferroni", "none")
Scores = Mapping[str, Mapping[str, np.ndarray]]  # {encoder: {variant: per-sample scores}}


def _vector(x: object, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(f"{what} holds {bad} non-finite value(s) (NaN or inf); fix the scoring stage that made them")
    return arr


def ecdf_pvalues(calibration: object, scores: object) -> np.ndarray:
    """Conformal ECDF p-values ``(1 + #{j : s_j <= s}) / (n + 1)``, in ``(0, 1]``.

    Args:
        calibration: held-out ID scores ``s_j`` (higher = more ID), disjoint from the density model's training data.
        scores: scores to convert.

    Raises:
        ValueError: empty calibration set or non-finite values.
    """
    cal = np.sort(_vector(calibration, "calibration scores"))
    if cal.size == 0:
        raise ValueError("ecdf_pvalues needs at least one calibration score")
    counts = np.searchsorted(cal, _vector(scores, "scores"), side="right")
    return (1.0 + counts) / (cal.size + 1.0)


def loo_pvalues(calibration: object) -> np.ndarray:
    """Leave-one-out ECDF p-values of the calibration scores themselves: point ``j`` against the other ``n - 1``
    (``#{k : s_k <= s_j} / n``, the count including ``j``), distributed like the p-value of a fresh ID point."""
    cal = _vector(calibration, "calibration scores")
    if cal.size < 2:
        raise ValueError("leave-one-out p-values need at least two calibration scores")
    counts = np.searchsorted(np.sort(cal), cal, side="right")
    return counts / cal.size


def min_statistic(pvalues: object) -> np.ndarray:
    """Elementwise minimum over the first axis of a ``(K, N)`` array (or a list of ``K`` vectors)."""
    arr = np.asarray(pvalues, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"min_statistic expects K >= 1 p-value vectors of equal length, got shape {arr.shape}")
    return arr.min(axis=0)


def tippett(p_min: object, k: int) -> np.ndarray:
    """``1 - (1 - p_min)^k`` computed without cancellation (``-expm1(k log1p(-p))``); Sidak's form is identical."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = np.clip(_vector(p_min, "p-values"), 0.0, 1.0)
    with np.errstate(divide="ignore"):  # p = 1 gives log1p(-1) = -inf and the exact result 1
        return -np.expm1(k * np.log1p(-p))


def recalibrate(p_min: object, k: int, method: Recalibration = "ecdf", calibration_min: object | None = None
                ) -> np.ndarray:
    """Turn the minimum of ``k`` p-values back into a p-value.

    Args:
        p_min: the min statistic of the samples to score.
        k: number of p-values the minimum was taken over.
        method: ``"ecdf"``, ``"tippett"``, ``"sidak"``, ``"bonferroni"`` or ``"none"`` (see the module docstring).
        calibration_min: the min statistic of held-out ID samples (needed by ``"ecdf"`` only).

    Raises:
        ValueError: unknown method, or ``"ecdf"`` without ``calibration_min``.
    """
    if method == "ecdf":
        if calibration_min is None:
            raise ValueError("recalibration 'ecdf' needs the min statistic of held-out ID calibration data")
        return ecdf_pvalues(calibration_min, p_min)
    if method in ("tippett", "sidak"):
        return tippett(p_min, k)
    if method == "bonferroni":
        return np.minimum(1.0, k * _vector(p_min, "p-values"))
    if method == "none":
        return _vector(p_min, "p-values")
    raise ValueError(f"unknown recalibration {method!r}; choose one of {RECALIBRATIONS}")


@dataclass
class GatePValues:
    """All levels of the gate for one set of samples.

    Attributes:
        level0: ``{encoder: {variant: p}}``, the per-detector ECDF p-values (calibrated on ``calib_1``).
        level1: ``{encoder: p}``, the recalibrated minimum over variants.
        level2: the recalibrated minimum over encoders: the EncMin2L p-value (ID-confidence; small = OOD).
    """

    level0: dict[str, dict[str, np.ndarray]]
    level1: dict[str, np.ndarray]
    level2: np.ndarray


@dataclass
class TwoLevelMinGate:
    """The fitted two-level min gate (see the module docstring); build it with :meth:`fit`.

    Attributes:
        calib1: sorted ``calib_1`` scores per ``(encoder, variant)``.
        level1_calib: min-over-variants statistic of ``calib_2`` per encoder (ECDF recalibration).
        level2_calib: min-over-encoders statistic of ``calib_2`` (ECDF recalibration).
        recalibration: the recalibration method of both levels.
    """

    calib1: dict[str, dict[str, np.ndarray]]
    level1_calib: dict[str, np.ndarray] = field(default_factory=dict)
    level2_calib: np.ndarray | None = None
    recalibration: Recalibration = "ecdf"

    @classmethod
    def fit(cls, calib1: Scores, calib2: Scores, recalibration: Recalibration = "ecdf") -> TwoLevelMinGate:
        """Fit on two disjoint held-out ID splits.

        Args:
            calib1: ``{encoder: {variant: scores}}`` of the ``calib_1`` split.
            calib2: the same for the ``calib_2`` split (same encoders and variants; ignored unless ``"ecdf"``).
            recalibration: see :func:`recalibrate`.

        Raises:
            ValueError: unknown method, empty or mismatched encoder/variant sets, or mismatched sample counts.
        """
        if recalibration not in RECALIBRATIONS:
            raise ValueError(f"unknown recalibration {recalibration!r}; choose one of {RECALIBRATIONS}")
        _check_layout(calib1, "calib_1")
        gate = cls({e: {v: np.sort(_vector(s, f"calib_1 scores of {e}/{v}")) for v, s in vs.items()}
                    for e, vs in calib1.items()}, recalibration=recalibration)
        if recalibration != "ecdf":
            return gate
        _check_layout(calib2, "calib_2", like=calib1)
        level1_loo = {}
        for e, vs in calib2.items():
            mins = min_statistic([gate._p0(e, v, s) for v, s in vs.items()])
            gate.level1_calib[e] = mins
            level1_loo[e] = loo_pvalues(mins)
        gate.level2_calib = min_statistic(list(level1_loo.values()))
        return gate

    def _p0(self, encoder: str, variant: str, scores: object) -> np.ndarray:
        return ecdf_pvalues(self.calib1[encoder][variant], scores)

    def pvalues(self, scores: Scores) -> GatePValues:
        """All gate levels for ``scores`` (``{encoder: {variant: scores}}``, the encoders and variants of the fit).

        Raises:
            ValueError: the encoders/variants differ from the fitted ones, or sample counts differ.
        """
        _check_layout(scores, "scores", like=self.calib1)
        level0 = {e: {v: self._p0(e, v, s) for v, s in vs.items()} for e, vs in scores.items()}
        level1 = {}
        for e, ps in level0.items():
            cal = self.level1_calib.get(e)
            level1[e] = recalibrate(min_statistic(list(ps.values())), len(ps), self.recalibration, cal)
        level2 = recalibrate(min_statistic(list(level1.values())), len(level1), self.recalibration,
                             self.level2_calib)
        return GatePValues(level0, level1, level2)

    def state_dict(self) -> dict:
        """Plain nested dict of arrays (for ``atomic_torch_save`` / JSON)."""
        return {"calib1": self.calib1, "level1_calib": self.level1_calib, "level2_calib": self.level2_calib,
                "recalibration": self.recalibration}


def _check_layout(scores: Scores, what: str, like: Scores | None = None) -> None:
    if not scores or any(not vs for vs in scores.values()):
        raise ValueError(f"{what}: need at least one encoder with at least one variant, got {_layout(scores)}")
    for e, vs in scores.items():
        lengths = {v: np.asarray(s).size for v, s in vs.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{what}: the variants of encoder {e!r} score different numbers of samples {lengths}")
    if like is not None and _layout(scores) != _layout(like):
        raise ValueError(f"{what} has encoders/variants {_layout(scores)} but the gate was fitted on {_layout(like)}")


def _layout(scores: Scores) -> dict[str, list[str]]:
    return {e: sorted(vs) for e, vs in sorted(scores.items())}
