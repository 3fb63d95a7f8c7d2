"""numerical_rank: the spec's cases, golden values of the reimplementation DHLSmith/jons-tunnel-effect (its
``estimate_rank`` in modes aTa / aaT / a and its streaming ``RankAnalyser``, run in float64 on the inputs below),
and the seeded column subsampling."""

from __future__ import annotations

import pytest
import torch

from lightning_methods.analysis.rank import column_subset, numerical_rank, spectrum

F64 = torch.float64


def golden_inputs() -> dict[str, torch.Tensor]:
    """The inputs the golden values were computed on (same generator stream as the reference run)."""
    g = torch.Generator().manual_seed(1234)
    cases = {"gauss_300x40": torch.randn(300, 40, generator=g, dtype=F64)}
    means = 10 * torch.randn(10, 128, generator=g, dtype=F64)
    y = torch.arange(5000) % 10
    cases["means10_5000x128"] = means[y] + 1e-6 * torch.randn(5000, 128, generator=g, dtype=F64)
    cases["lowrank7_200x60"] = torch.randn(200, 7, generator=g, dtype=F64) @ torch.randn(7, 60, generator=g, dtype=F64)
    cases["aniso_400x50"] = torch.randn(400, 50, generator=g, dtype=F64) * torch.logspace(0, -3, 50, dtype=F64)
    cases["wide_30x500"] = torch.randn(30, 500, generator=g, dtype=F64)
    return cases


#: reimplementation outputs: {case: {rtol: rank}}, identical for its modes aTa, aaT, a and the streaming analyser
GOLDEN = {
    "gauss_300x40": {1e-3: 40, 1e-2: 40, 1e-1: 40},
    "means10_5000x128": {1e-3: 9, 1e-2: 9, 1e-1: 9},
    "lowrank7_200x60": {1e-3: 7, 1e-2: 7, 1e-1: 7},
    "aniso_400x50": {1e-3: 24, 1e-2: 16, 1e-1: 8},
    "wide_30x500": {1e-3: 29, 1e-2: 29, 1e-1: 29},
}


@pytest.mark.parametrize("mode", ["covariance", "gram", "svd"])
def test_matches_reimplementation_golden_values(mode):
    for name, x in golden_inputs().items():
        for rtol, expected in GOLDEN[name].items():
            assert numerical_rank(x, rtol=rtol, mode=mode, max_columns=None) == expected, (name, rtol, mode)


def test_spec_cases():
    g = torch.Generator().manual_seed(0)
    assert numerical_rank(torch.randn(500, 64, generator=g)) == 64  # Gaussian, n > d -> d
    means = 5 * torch.randn(10, 128, generator=g, dtype=F64)
    x = means[torch.arange(5000) % 10] + 1e-6 * torch.randn(5000, 128, generator=g, dtype=F64)
    assert numerical_rank(x) == 9  # 10 well-separated class means, centred -> C - 1
    u, v = torch.randn(300, 5, generator=g), torch.randn(5, 90, generator=g)
    assert numerical_rank(u @ v) == 5  # rank-r product
    aniso = golden_inputs()["aniso_400x50"]
    for scale in (1e-6, 1.0, 1e6):
        assert numerical_rank(aniso * scale) == 24  # scale invariant
    assert numerical_rank(torch.randn(30, 500, generator=g)) == 29  # at most n - 1 after centring


def test_rank_depends_on_the_threshold_not_the_layout():
    x = golden_inputs()["aniso_400x50"]
    four_d = x.reshape(400, 2, 5, 5)  # conv-shaped features are flattened
    assert numerical_rank(four_d, rtol=1e-2) == numerical_rank(x, rtol=1e-2) == 16
    # the covariance eigenvalues are the squared singular values of the centred features / (n - 1)
    s = torch.linalg.svdvals(x - x.mean(0)).square() / 399
    torch.testing.assert_close(spectrum(x, "covariance", None), s, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(spectrum(x, "gram", None)[:50], s, rtol=1e-10, atol=1e-14)


def test_column_subsampling_is_seeded_and_shared_by_equal_widths():
    a, b = column_subset(20000, 8000, seed=3), column_subset(20000, 8000, seed=3)
    assert torch.equal(a, b) and len(a) == 8000 and len(a.unique()) == 8000
    assert not torch.equal(a, column_subset(20000, 8000, seed=4))
    assert column_subset(8000, 8000) is None and column_subset(100, None) is None
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(12, 9000, generator=g, dtype=F64)
    x = torch.randn(400, 12, generator=g, dtype=F64) @ basis
    assert numerical_rank(x, max_columns=8000, seed=0) == numerical_rank(x, max_columns=8000, seed=0) == 12
    f = x[:, column_subset(9000, 8000, seed=0)]  # what the rank sees
    assert numerical_rank(f, max_columns=None) == 12


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        numerical_rank(torch.ones(1, 5))
    with pytest.raises(ValueError, match="rank mode"):
        numerical_rank(torch.ones(4, 5), mode="trace")
    with pytest.raises(ValueError, match="rtol"):
        numerical_rank(torch.randn(4, 5), rtol=0.0)
    assert numerical_rank(torch.ones(6, 3)) == 0  # constant features: no variance at all
