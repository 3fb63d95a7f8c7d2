"""Tunnel start (the spec's curve), elbow, OOD retention and Harun et al.'s strength bins."""

from __future__ import annotations

import pytest

from lightning_methods.tunnel import elbow, ood_retained, tunnel_start, tunnel_strength


def test_spec_curve_starts_at_the_first_plateau_point():
    curve = [0.3, 0.6, 0.8, 0.9, 0.9, 0.9]  # bar 0.95 * 0.9 = 0.855
    assert tunnel_start(curve, 0.95) == 3
    assert tunnel_start(curve, 0.85) == 2  # bar 0.765: 0.8 qualifies
    assert tunnel_start(curve, 1.0) == 3
    assert tunnel_start([0.5, 0.9, 0.7, 0.95], 0.95) == 3  # the first layer over the bar, not after a dip
    assert tunnel_start([0.2], 0.95) == 0


def test_elbow_is_the_sharpest_bend():
    assert elbow([0.1, 0.2, 0.3, 0.9, 0.91, 0.92]) == 3  # second differences 0, 0.5, -0.59, 0
    assert elbow([0.3, 0.6, 0.8, 0.9, 0.9, 0.9]) == 1  # equal bends: the earliest
    assert elbow([0.1, 0.5]) is None


def test_ood_retention_and_strength_bins():
    assert ood_retained([0.4, 0.5, 0.45, 0.4]) == pytest.approx(80.0)
    assert [tunnel_strength(p) for p in (100.0, 95.0, 94.9, 90.0, 85.0, 79.9)] == [
        "negligible", "negligible", "weak", "weak", "medium", "strong"]
    assert tunnel_strength(float("nan")) == "undefined"


def test_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        tunnel_start([0.5], 1.5)
    with pytest.raises(ValueError, match="empty"):
        tunnel_start([])
    with pytest.raises(ValueError, match="non-finite"):
        tunnel_start([0.1, float("nan")])
