"""MAD and normalized entropy: the spec's reference values, an independent reference implementation's numbers,
monotonicity, CLS handling and renormalisation, summaries, probe-set choice."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lightning_methods.analysis.attention import (
    MAD_NORMS,
    early_layers,
    locality_summary,
    mad_scale,
    mean_attention_distance,
    min_over_heads,
    normalize_mad,
    normalized_entropy,
    patch_attention,
    patch_distances,
    probe_indices,
)

# The spec's reference table (8x8 grid): uniform attention over the 64 patches, and identity attention.
UNIFORM_PATCH, UNIFORM_NORMED = 4.1365, {"grid": 0.5171, "diag": 0.3656, "maxdist": 0.4178}

# Golden values from an independent MAD implementation, the "mean_attention_distance" notebook of
# all-things-vits/code-samples (CVPR 2023 tutorial, after "Do Vision Transformers See Like CNNs?"), run on the inputs
# of _softmax_inputs below in /tmp: MAD in pixels (patch size 4) after slicing off the CLS row and column WITHOUT
# renormalising the rows, mean over the query patches.
OFFICIAL_4X4 = [[7.681207195209431, 7.951750467117304, 7.3731746259768265],
                [7.946019329231292, 7.452772525097535, 7.42367697605769]]
OFFICIAL_8X8 = [[15.777278601451746, 17.00145028333219]]
OFFICIAL_UNIFORM_65 = 16.291378063381188  # uniform over 65 tokens (CLS included), CLS sliced off


def _softmax_inputs(seed: int, shape: tuple[int, ...], scale: float) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=shape) * scale
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    return attn / attn.sum(-1, keepdims=True)


def test_uniform_attention_matches_the_reference_table():
    rows = torch.full((64, 64), 1 / 64, dtype=torch.float64)
    mad = float(mean_attention_distance(rows, 8))
    assert mad == pytest.approx(UNIFORM_PATCH, abs=1e-4)
    for norm, value in UNIFORM_NORMED.items():
        assert normalize_mad(mad, norm, 8) == pytest.approx(value, abs=1e-4)
    assert float(normalized_entropy(rows)) == pytest.approx(1.0, abs=1e-12)


def test_uniform_mad_is_the_mean_distance_over_all_ordered_pairs():
    points = list(itertools.product(range(8), range(8)))
    brute = sum(math.dist(a, b) for a in points for b in points) / len(points) ** 2  # self-pairs included
    rows = torch.full((64, 64), 1 / 64, dtype=torch.float64)
    assert float(mean_attention_distance(rows, 8)) == pytest.approx(brute, rel=1e-14)


def test_identity_attention_has_zero_mad_and_zero_entropy():
    eye = torch.eye(64, dtype=torch.float64)
    assert float(mean_attention_distance(eye, 8)) == 0.0
    assert float(normalized_entropy(eye)) == 0.0


def test_matches_the_reference_implementation_in_pixels():
    """CLS sliced off without renormalisation == our include_cls=False, renormalize=False (and == include_cls=True,
    where the CLS key counts as distance 0)."""
    for seed, shape, scale, golden in ((0, (2, 3, 17, 17), 2.0, OFFICIAL_4X4), (1, (1, 2, 65, 65), 3.0, OFFICIAL_8X8)):
        attn = torch.from_numpy(_softmax_inputs(seed, shape, scale))
        grid = int(math.isqrt(shape[-1] - 1))
        for kw in ({"include_cls": False, "renormalize": False}, {"include_cls": True}):
            mad = mean_attention_distance(patch_attention(attn, 1, **kw), grid)
            pixels = normalize_mad(mad, "pixel", grid, patch_size=4)
            torch.testing.assert_close(pixels, torch.tensor(golden, dtype=torch.float64), rtol=0, atol=1e-12)
    uniform = torch.full((65, 65), 1 / 65, dtype=torch.float64)
    mad = mean_attention_distance(patch_attention(uniform, 1, renormalize=False), 8)
    assert float(mad) * 4 == pytest.approx(OFFICIAL_UNIFORM_65, abs=1e-12)


def test_renormalisation_after_dropping_cls():
    attn = torch.from_numpy(_softmax_inputs(3, (2, 4, 65, 65), 2.0))
    rows = patch_attention(attn, num_prefix_tokens=1)
    assert rows.shape == (2, 4, 64, 64)
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 4, 64, dtype=torch.float64))
    torch.testing.assert_close(rows, attn[..., 1:, 1:] / attn[..., 1:, 1:].sum(-1, keepdim=True))
    raw = patch_attention(attn, 1, renormalize=False)
    assert (raw.sum(-1) < 1).all()
    with_cls = patch_attention(attn, 1, include_cls=True)
    assert with_cls.shape == (2, 4, 64, 65)
    torch.testing.assert_close(with_cls.sum(-1), torch.ones(2, 4, 64, dtype=torch.float64))
    # entropy over the 65 keys is normalized by log 65: uniform rows including CLS -> 1
    assert float(normalized_entropy(torch.full((64, 65), 1 / 65, dtype=torch.float64))) == pytest.approx(1.0)
    # two prefix tokens (DeiT's CLS + distillation token)
    assert patch_attention(torch.from_numpy(_softmax_inputs(4, (1, 1, 18, 18), 1.0)), 2).shape == (1, 1, 16, 16)


def test_moving_mass_to_a_nearer_patch_strictly_lowers_mad():
    rng = np.random.default_rng(0)
    dist = patch_distances(8).numpy()
    for _ in range(60):
        rows = torch.from_numpy(_softmax_inputs(int(rng.integers(1 << 30)), (64, 64), 2.0))
        i = int(rng.integers(64))
        far, near = rng.choice(64, 2, replace=False)
        if dist[i, far] == dist[i, near]:
            continue
        if dist[i, far] < dist[i, near]:
            far, near = near, far
        moved = rows.clone()
        delta = float(moved[i, far]) * float(rng.uniform(0.1, 1.0))
        moved[i, far] -= delta
        moved[i, near] += delta
        before, after = float(mean_attention_distance(rows, 8)), float(mean_attention_distance(moved, 8))
        assert after < before
        assert before - after == pytest.approx(delta * (dist[i, far] - dist[i, near]) / 64, rel=1e-9)


def test_entropy_is_one_for_uniform_and_zero_for_one_hot_rows_of_any_width():
    for k in (2, 17, 64):
        assert float(normalized_entropy(torch.full((5, k), 1.0 / k, dtype=torch.float64))) == pytest.approx(1.0)
        one_hot = torch.zeros(5, k, dtype=torch.float64)
        one_hot[:, 0] = 1
        assert float(normalized_entropy(one_hot)) == 0.0
    with pytest.raises(ValueError, match="at least 2 keys"):
        normalized_entropy(torch.ones(3, 1))


def test_normalisations_and_their_errors():
    assert mad_scale("grid", 8) == 8 and mad_scale("diag", 8) == pytest.approx(8 * math.sqrt(2))
    assert mad_scale("maxdist", 8) == pytest.approx(7 * math.sqrt(2)) and mad_scale("patch", (4, 6)) == 1
    assert normalize_mad(2.0, "pixel", 8, patch_size=4) == 8.0
    with pytest.raises(ValueError, match="square"):
        mad_scale("grid", (4, 6))
    with pytest.raises(ValueError, match="2x2"):
        mad_scale("maxdist", 1)
    with pytest.raises(ValueError, match="unknown MAD normalisation"):
        mad_scale("pixels", 8)
    with pytest.raises(ValueError, match="patch size"):
        mad_scale("pixel", 8)
    with pytest.raises(ValueError, match="do not fit a 8x8 grid"):
        mean_attention_distance(torch.full((16, 16), 1 / 16), 8)


def test_min_over_heads_and_summary():
    mad = torch.tensor([[3.0, 2.0], [1.0, 4.0], [0.5, 6.0], [0.1, 7.0]], dtype=torch.float64)
    ent = torch.tensor([[0.9, 0.8], [0.7, 0.6], [0.5, 0.4], [0.3, 0.2]], dtype=torch.float64)
    assert min_over_heads(mad, 0) == 2.0 and min_over_heads(mad, [0, 1, 2]) == 0.5 and min_over_heads(mad, -1) == 0.1
    assert early_layers(4) == [0, 1, 2] and early_layers(2) == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        min_over_heads(mad, 4)
    s = locality_summary(mad, ent, 8)
    assert s["min_mad_grid/layer0"] == pytest.approx(2.0 / 8) and s["min_mad_grid/early"] == pytest.approx(0.5 / 8)
    assert s["min_mad_diag/layer0"] == pytest.approx(2.0 / (8 * math.sqrt(2)))
    assert s["mean_mad_maxdist/early"] == pytest.approx(float(mad[:3].mean()) / (7 * math.sqrt(2)))
    assert s["mad_grid/L3H1"] == pytest.approx(7 / 8) and s["entropy/L1H0"] == pytest.approx(0.7)
    assert s["mean_entropy/early"] == pytest.approx(0.65) and s["min_entropy/layer0"] == pytest.approx(0.8)
    assert len([k for k in s if k.startswith("mad_")]) == 8 * len(MAD_NORMS)


def test_probe_indices_are_seeded_sorted_and_bounded():
    a, b = probe_indices(100, 10, seed=3), probe_indices(100, 10, seed=3)
    assert torch.equal(a, b) and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 10
    assert not torch.equal(a, probe_indices(100, 10, seed=4))
    with pytest.raises(ValueError, match="at most 100"):
        probe_indices(100, 1000)
