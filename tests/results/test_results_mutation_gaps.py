"""Gaps found by mutation testing of the results layer: ``--paired`` pairs runs by seed (not by their order in the
rows), whether a record holds its seed as a number or as text."""

from __future__ import annotations

import pytest

from lightning_methods.results import compare
from lightning_methods.results.aggregate import Row


def test_paired_rows_pair_by_seed_not_by_position_and_seed_type():
    """The row's runs come in seed order 2, 0, 1 with their seeds written as text; the baseline's in order 0, 1, 2 as
    numbers. Paired by seed every difference is +1 point (apart, chance 2 / 2**3); paired by position the signs
    would differ (71 vs 50, 51 vs 60), and seeds compared by type would pair nothing. The difference of the means is
    61 - 60 = 1 up to the rounding of 100 x the stored fractions (a few eps x 100)."""
    base = Row("base", "", [{"info": {"seed": s}, "metrics": {"test/acc": v}} for s, v in [(0, 0.50), (1, 0.60),
                                                                                           (2, 0.70)]])
    other = Row("other", "", [{"info": {"seed": s}, "metrics": {"test/acc": v}} for s, v in [("2", 0.71), ("0", 0.51),
                                                                                             ("1", 0.61)]])
    (c,) = compare.compare_rows([base, other], base, ["test/acc"], paired=True)
    assert c.paired and c.row == "other" and len(c.values) == 3
    pairs = sorted(zip(c.baseline_values, c.values))
    assert [v for pair in pairs for v in pair] == pytest.approx([50, 51, 60, 61, 70, 71], abs=1e-12)
    assert c.apart == 1 and c.chance == 0.25
    assert c.diff == pytest.approx(1.0, abs=1e-12)
