"""ECDF p-values, the min gates and their recalibration (lightning_methods.ood.pvalues)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lightning_methods.ood.metrics import auroc
from lightning_methods.ood.pvalues import (
    TwoLevelMinGate,
    ecdf_pvalues,
    loo_pvalues,
    min_statistic,
    recalibrate,
    tippett,
)


def test_ecdf_formula_by_hand():
    cal = [3.0, 1.0, 2.0, 2.0]
    p = ecdf_pvalues(cal, [0.5, 1.0, 2.0, 2.5, 9.0])
    # (1 + #{s_j <= s}) / (n + 1) with n = 4
    np.testing.assert_array_equal(p, np.array([1, 2, 4, 4, 5]) / 5)
    assert (p > 0).all() and (p <= 1).all()


def test_ecdf_is_uniform_on_calibration_and_valid_on_fresh_draws():
    rng = np.random.default_rng(0)
    cal = rng.normal(size=10_000)
    p_self = ecdf_pvalues(cal, cal)
    assert stats.kstest(p_self, "uniform").statistic < 0.05
    fresh = ecdf_pvalues(cal, rng.normal(size=20_000))
    assert abs(np.mean(fresh <= 0.05) - 0.05) < 0.01
    loo = loo_pvalues(cal)
    assert stats.kstest(loo, "uniform").statistic < 0.05
    np.testing.assert_allclose(np.sort(loo), np.arange(1, 10_001) / 10_000)


def test_min_gate_over_identical_detectors_is_identity_after_recalibration():
    rng = np.random.default_rng(1)
    cal1, cal2, test = rng.normal(size=300), rng.normal(size=200), rng.normal(0.5, 1.5, size=100)
    one = TwoLevelMinGate.fit({"e": {"v": cal1}}, {"e": {"v": cal2}})
    many = TwoLevelMinGate.fit({f"e{i}": {f"v{j}": cal1 for j in range(3)} for i in range(4)},
                               {f"e{i}": {f"v{j}": cal2 for j in range(3)} for i in range(4)})
    p_one = one.pvalues({"e": {"v": test}})
    p_many = many.pvalues({f"e{i}": {f"v{j}": test for j in range(3)} for i in range(4)})
    np.testing.assert_array_equal(p_many.level2, p_one.level2)
    np.testing.assert_array_equal(p_many.level1["e2"], p_one.level1["e"])
    # recalibrating a single in-sample ECDF p-value on its own calibration set gives it back exactly
    p = ecdf_pvalues(cal2, test)
    np.testing.assert_array_equal(recalibrate(p, 1, "ecdf", ecdf_pvalues(cal2, cal2)), p)
    # the Tippett form is not the identity for identical (fully dependent) detectors: it is conservative
    assert (recalibrate(p, 4, "tippett")[p < 1] > p[p < 1]).all()


def test_auroc_is_invariant_to_the_tippett_map():
    rng = np.random.default_rng(2)
    p_id, p_ood = rng.uniform(size=500), rng.beta(0.5, 2.0, size=300)
    for k in (2, 3, 7):
        assert auroc(tippett(p_id, k), tippett(p_ood, k)) == pytest.approx(auroc(p_id, p_ood), abs=1e-15)


def test_tippett_and_other_recalibrations():
    p = np.array([0.0, 1e-12, 0.01, 0.5, 1.0])
    big = p >= 0.01
    np.testing.assert_allclose(tippett(p, 3)[big], 1 - (1 - p[big]) ** 3, rtol=1e-12)
    assert tippett(p, 3)[1] == pytest.approx(3e-12, rel=1e-9)  # no cancellation for tiny p (the naive form: 1e-5 off)
    np.testing.assert_array_equal(recalibrate(p, 3, "sidak"), tippett(p, 3))
    np.testing.assert_array_equal(recalibrate(p, 3, "bonferroni"), np.minimum(1, 3 * p))
    np.testing.assert_array_equal(recalibrate(p, 3, "none"), p)
    np.testing.assert_array_equal(min_statistic([[0.3, 0.1], [0.2, 0.4]]), [0.2, 0.1])


def test_independent_detectors_tippett_matches_ecdf_recalibration():
    """For independent uniform p-values the min statistic's ECDF approaches 1 - (1 - p)^K."""
    rng = np.random.default_rng(3)
    k = 3
    cal_min = rng.uniform(size=(k, 50_000)).min(axis=0)
    grid = np.linspace(0.01, 0.9, 20)
    np.testing.assert_allclose(recalibrate(grid, k, "ecdf", cal_min), tippett(grid, k), atol=0.01)


def test_two_level_gate_levels_and_recalibration_choices():
    rng = np.random.default_rng(4)
    cal1 = {"a": {"raw": rng.normal(size=4000), "l2": rng.normal(size=4000)}, "b": {"raw": rng.normal(size=4000)}}
    cal2 = {"a": {"raw": rng.normal(size=3000), "l2": rng.normal(size=3000)}, "b": {"raw": rng.normal(size=3000)}}
    gate = TwoLevelMinGate.fit(cal1, cal2)
    fresh = {"a": {"raw": rng.normal(size=5000), "l2": rng.normal(size=5000)}, "b": {"raw": rng.normal(size=5000)}}
    out = gate.pvalues(fresh)
    # every level is a valid p-value on fresh ID data
    for p in (out.level0["a"]["raw"], out.level1["a"], out.level1["b"], out.level2):
        assert abs(np.mean(p <= 0.1) - 0.1) < 0.02
    np.testing.assert_array_equal(out.level1["b"], recalibrate(out.level0["b"]["raw"], 1, "ecdf",
                                                               gate.level1_calib["b"]))
    tip = TwoLevelMinGate.fit(cal1, cal2, recalibration="tippett").pvalues(fresh)
    level1_a = tippett(np.minimum(out.level0["a"]["raw"], out.level0["a"]["l2"]), 2)
    np.testing.assert_allclose(tip.level1["a"], level1_a)
    np.testing.assert_allclose(tip.level2, tippett(np.minimum(level1_a, tip.level1["b"]), 2))


def test_gate_bad_input_is_named():
    gate = TwoLevelMinGate.fit({"a": {"raw": [1.0, 2.0]}}, {"a": {"raw": [1.0, 3.0]}})
    with pytest.raises(ValueError, match="fitted on"):
        gate.pvalues({"b": {"raw": np.zeros(3)}})
    with pytest.raises(ValueError, match="unknown recalibration"):
        TwoLevelMinGate.fit({"a": {"raw": [1.0]}}, {"a": {"raw": [1.0]}}, recalibration="fisher")
    with pytest.raises(ValueError, match="non-finite"):
        ecdf_pvalues([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="different numbers"):
        TwoLevelMinGate.fit({"a": {"raw": [1.0, 2.0], "l2": [1.0]}}, {"a": {"raw": [1.0], "l2": [1.0]}})
