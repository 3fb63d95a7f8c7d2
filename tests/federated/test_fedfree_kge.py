"""Histogram entropy, Knowledge Gain Entropy (Eq. 6), the alignment choice and the projection (Eq. 7)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_methods.federated.kge import histogram_entropy, kge, kge_select, project_layer
from lightning_methods.federated.layers import LayerSpec


def test_entropy_of_a_uniform_spread_is_log_bins():
    for m in (1, 4, 7):
        assert histogram_entropy(torch.linspace(-3, 5, 256 * m)) == pytest.approx(math.log(256), abs=1e-12)
    assert histogram_entropy(torch.linspace(0, 1, 64 * 5), bins=64) == pytest.approx(math.log(64), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_of_gaussian_samples(seed):
    """Discretised Gaussian: H ~ h(N(0,1)) - log(bin width) = 0.5 log(2 pi e) + log(256 / range); ~4.74-4.81 nats
    for 100k samples (the sample range decides where)."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = 0.5 * math.log(2 * math.pi * math.e) + math.log(256 / float(x.max() - x.min()))
    h = histogram_entropy(x)
    assert h == pytest.approx(expected, abs=0.02)
    assert 4.70 < h < 4.85


def test_entropy_constant_and_affine_invariance():
    assert histogram_entropy(torch.full((50,), 3.0)) == 0.0
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = histogram_entropy(x)
    assert histogram_entropy(2.5 * x - 7.0) == pytest.approx(h, abs=1e-9)
    assert histogram_entropy(x.view(50, 100)) == h  # flattened
    assert 0 < h <= math.log(256)


def test_kge_is_antisymmetric_and_a_difference_of_entropies():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(300, generator=g), torch.randn(40, 5, generator=g)
    assert kge(a, b) == pytest.approx(-kge(b, a), abs=1e-15)
    assert kge(a, b) == pytest.approx(histogram_entropy(a) - histogram_entropy(b))
    assert kge(a, a) == 0.0


def _spec(name: str, kind: str) -> LayerSpec:
    return LayerSpec(name=name, kind=kind, index=0, count=1, in_features=4, out_features=4)


def test_kge_select_largest_positive_same_kind():
    local = [_spec("l_conv", "conv"), _spec("l_fc", "linear")]
    glob = [_spec("g_conv", "conv"), _spec("g_fc1", "linear"), _spec("g_fc2", "linear")]
    h_local = {"l_conv": 4.0, "l_fc": 3.0}
    h_global = {"g_conv": 4.5, "g_fc1": 3.2, "g_fc2": 3.9}
    choice = kge_select(h_local, local, h_global, glob)
    assert (choice.local_name, choice.global_name) == ("l_fc", "g_fc2")
    assert choice.kge == pytest.approx(0.9)
    # a higher-entropy layer of another kind never wins
    assert kge_select({"l_fc": 3.0}, local[1:], {"g_conv": 9.0, "g_fc1": 2.0, "g_fc2": 2.5}, glob) is None
    # no positive KGE -> nothing is sent
    assert kge_select(h_local, local, {"g_conv": 4.0, "g_fc1": 1.0, "g_fc2": 3.0}, glob) is None
    # ties: the first local layer, then the first global layer
    tie = kge_select({"l_conv": 1.0, "l_fc": 1.0}, local, {"g_conv": 2.0, "g_fc1": 2.0, "g_fc2": 2.0}, glob)
    assert (tie.local_name, tie.global_name) == ("l_conv", "g_conv")
    # kge_candidates="mapped": only the global layer each local layer was distilled into
    only = kge_select(h_local, local, h_global, glob, {"l_conv": ["g_conv"], "l_fc": ["g_fc1"]})
    assert (only.local_name, only.global_name) == ("l_conv", "g_conv") and only.kge == pytest.approx(0.5)


def test_projection_prefix_copy_keep_and_zero():
    g = {"weight": torch.arange(1.0, 13.0).view(3, 4), "bias": torch.tensor([100.0, 200.0, 300.0])}
    local = {"weight": -torch.ones(2, 2, 5), "bias": -torch.ones(5)}
    keep = project_layer(g, local, "keep")
    assert keep["weight"].shape == (2, 2, 5) and keep["bias"].shape == (5,)
    flat = keep["weight"].flatten()
    assert torch.equal(flat[:12], torch.arange(1.0, 13.0)) and torch.equal(flat[12:], -torch.ones(8))
    assert keep["bias"].tolist() == [100.0, 200.0, 300.0, -1.0, -1.0]
    zero = project_layer(g, local, "zero")
    assert torch.equal(zero["weight"].flatten()[12:], torch.zeros(8)) and zero["bias"].tolist()[3:] == [0.0, 0.0]
    assert torch.equal(local["weight"], -torch.ones(2, 2, 5))  # inputs untouched
    small = project_layer(g, {"weight": torch.zeros(2, 3)}, "keep")  # no local bias: the global bias is ignored
    assert set(small) == {"weight"} and small["weight"].flatten().tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="projection_fill"):
        project_layer(g, local, "mean")
