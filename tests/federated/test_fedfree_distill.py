"""Reverse layer-wise knowledge transfer on Gaussian pseudo-data (Eqs. 3-5): convergence, fixed points, the
crop / zero-pad rules and the 2-alpha rate of the ``sum_units`` reduction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_methods.federated.distill import (
    center_crop_pair,
    distill_layer,
    distillation_loss,
    pseudo_input,
    teacher_output,
)
from lightning_methods.federated.layers import LayerSpec

LIN = LayerSpec(name="fc", kind="linear", index=0, count=1, in_features=8, out_features=4)
CONV = LayerSpec(name="c", kind="conv", index=0, count=1, in_features=3, out_features=6, kernel=(5, 5),
                 input_size=(12, 12))


def _params(spec: LayerSpec, seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (spec.out_features, spec.in_features // spec.groups, *spec.kernel) if spec.kind == "conv" else (
        spec.out_features, spec.in_features)
    return {"weight": torch.randn(*shape, generator=g, dtype=dtype), "bias": torch.randn(spec.out_features,
                                                                                     generator=g, dtype=dtype)}


def test_linear_layer_converges_to_the_client_layer():
    g, t = _params(LIN, 0), _params(LIN, 1)
    new, losses = distill_layer(g, LIN, [(t, LIN)], steps=200, lr=0.1, batch_size=64,
                                generator=torch.Generator().manual_seed(0))
    assert (new["weight"] - t["weight"]).norm() < 1e-8 and (new["bias"] - t["bias"]).norm() < 1e-8
    assert losses[0] > 10 and losses[-1] < 1e-12


def test_two_client_layers_pull_to_their_mean():
    g, t1, t2 = _params(LIN, 0), _params(LIN, 1), _params(LIN, 2)
    new, _ = distill_layer(g, LIN, [(t1, LIN), (t2, LIN)], steps=300, lr=0.1, batch_size=64)
    assert torch.allclose(new["weight"], (t1["weight"] + t2["weight"]) / 2, atol=1e-8)


def test_identical_layers_give_zero_loss_and_no_change():
    g = _params(CONV, 0, torch.float32)
    new, losses = distill_layer(g, CONV, [(g, CONV)], steps=3, lr=0.5, batch_size=8)
    assert losses == [0.0, 0.0, 0.0]
    assert torch.equal(new["weight"], g["weight"]) and torch.equal(new["bias"], g["bias"])


def test_one_step_moves_two_alpha_of_the_way_in_expectation():
    """With X ~ N(0, I): grad = 2 (W_g - W_t) E[x x^T] -> a step of lr alpha shrinks the gap by ~(1 - 2 alpha)."""
    g, t = _params(LIN, 0), _params(LIN, 1)
    new, _ = distill_layer(g, LIN, [(t, LIN)], steps=1, lr=0.05, batch_size=20_000)
    ratio = (new["weight"] - t["weight"]).norm() / (g["weight"] - t["weight"]).norm()
    assert ratio == pytest.approx(0.9, abs=0.01)
    x = pseudo_input(LIN, 16, torch.Generator().manual_seed(0), dtype=torch.float64)
    mean_loss = distillation_loss(g, LIN, [(t, LIN)], x, "mean")
    assert distillation_loss(g, LIN, [(t, LIN)], x) == pytest.approx(4 * float(mean_loss))  # 4 output units


def test_wider_client_input_equals_zero_padded_pseudo_data():
    wide = LayerSpec(name="w", kind="linear", index=0, count=1, in_features=12, out_features=6)
    t = _params(wide, 3)
    x = torch.randn(5, 8, dtype=torch.float64)
    explicit = F.linear(F.pad(x, (0, 4)), t["weight"], t["bias"])[:, :4]
    assert torch.allclose(teacher_output(t, wide, x, 4), explicit)
    narrow = LayerSpec(name="n", kind="linear", index=0, count=1, in_features=5, out_features=3)
    tn = _params(narrow, 4)
    assert torch.allclose(teacher_output(tn, narrow, x, 3), F.linear(x[:, :5], tn["weight"], tn["bias"]))


def test_conv_teacher_crop_pad_and_grouped_layers():
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    wide = LayerSpec(name="w", kind="conv", index=0, count=1, in_features=8, out_features=10, kernel=(3, 3),
                     padding=(1, 1))
    t = _params(wide, 5)
    explicit = F.conv2d(F.pad(x, (0, 0, 0, 0, 0, 5)), t["weight"], t["bias"], padding=1)[:, :6]
    assert torch.allclose(teacher_output(t, wide, x, 6), explicit)
    dw = LayerSpec(name="dw", kind="conv", index=0, count=1, in_features=5, out_features=5, kernel=(3, 3),
                   padding=(1, 1), groups=5)
    td = _params(dw, 6)
    explicit = F.conv2d(F.pad(x, (0, 0, 0, 0, 0, 2)), td["weight"], td["bias"], padding=1, groups=5)[:, :4]
    assert torch.allclose(teacher_output(td, dw, x, 4), explicit)


def test_center_crop_aligns_unpadded_and_padded_convs():
    """A 5x5 valid conv and a 5x5 'same' conv with the same weights agree on the centred common window."""
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    p = _params(CONV, 0)
    valid = F.conv2d(x, p["weight"], p["bias"])
    same = F.conv2d(x, p["weight"], p["bias"], padding=2)
    a, b = center_crop_pair(valid, same)
    assert a.shape == b.shape == (2, 6, 8, 8) and torch.allclose(a, b)
    same_spec = LayerSpec(name="s", kind="conv", index=0, count=1, in_features=3, out_features=6, kernel=(5, 5),
                          padding=(2, 2))
    assert float(distillation_loss(p, CONV, [(p, same_spec)], x)) == pytest.approx(0.0, abs=1e-20)


def test_pseudo_input_shapes_and_errors():
    gen = torch.Generator().manual_seed(0)
    assert pseudo_input(CONV, 4, gen).shape == (4, 3, 12, 12)
    assert pseudo_input(CONV, 4, gen, spatial=8).shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="no traced input size"):
        pseudo_input(LayerSpec(name="c", kind="conv", index=0, count=1, in_features=3, out_features=4), 2, gen)
    with pytest.raises(ValueError, match="cannot distil"):
        distillation_loss(_params(LIN, 0), LIN, [(_params(CONV, 0), CONV)], torch.randn(2, 8, dtype=torch.float64))


def test_merging_client_layers_keeps_the_exact_update():
    """Grouped client layers (same geometry and compared widths) give the same step as the unmerged Eq. 3."""
    from lightning_methods.federated.distill import merge_teachers

    glob = LayerSpec(name="g", kind="conv", index=0, count=2, in_features=8, out_features=6, kernel=(3, 3),
                     padding=(1, 1), input_size=(6, 6))
    same = LayerSpec(name="a", kind="conv", index=3, count=9, in_features=16, out_features=10, kernel=(3, 3),
                     padding=(1, 1))  # two of these merge
    other = LayerSpec(name="b", kind="conv", index=1, count=4, in_features=4, out_features=6, kernel=(3, 3),
                      padding=(1, 1), bias=False)
    dw = LayerSpec(name="d", kind="conv", index=2, count=5, in_features=8, out_features=8, kernel=(3, 3), padding=(1,
                   1), groups=8)
    teachers = [(_params(same, 1), same), (_params(same, 2), same), ({"weight": _params(other, 3)["weight"]}, other),
                (_params(dw, 4), dw)]
    assert sorted(n for _, _, n in merge_teachers(teachers, glob)) == [1, 1, 2]
    _assert_one_step_is_unmerged_eq3(glob, teachers, batch_size=4, seed=7)


def test_merging_keeps_grouped_layers_of_other_output_widths_apart():
    """Two grouped convs with the same input width and groups but other output widths (a channel multiplier) are
    different maps of the pseudo-data: they are not merged, and the step equals the unmerged Eq. 3's."""
    from lightning_methods.federated.distill import merge_teachers

    glob = LayerSpec(name="g", kind="conv", index=0, count=1, in_features=4, out_features=4, kernel=(3, 3),
                     padding=(1, 1), input_size=(5, 5))
    dw = LayerSpec(name="a", kind="conv", index=0, count=1, in_features=4, out_features=4, kernel=(3, 3),
                   padding=(1, 1), groups=4)
    dw2 = LayerSpec(name="b", kind="conv", index=0, count=1, in_features=4, out_features=8, kernel=(3, 3),
                    padding=(1, 1), groups=4)  # two output channels per input channel
    teachers = [(_params(dw, 1), dw), (_params(dw2, 2), dw2)]
    assert sorted(n for _, _, n in merge_teachers(teachers, glob)) == [1, 1]
    _assert_one_step_is_unmerged_eq3(glob, teachers, batch_size=3, seed=4)


def _assert_one_step_is_unmerged_eq3(glob: LayerSpec, teachers: list, batch_size: int, seed: int) -> None:
    """One distillation step (teachers merged where they compute the same) equals a plain gradient step on Eq. 3's
    loss over every teacher (autograd, float64; both sides the same few float64 operations)."""
    g = _params(glob, 0)
    new, _ = distill_layer(g, glob, teachers, steps=1, lr=0.1, batch_size=batch_size,
                           generator=torch.Generator().manual_seed(seed))
    x = pseudo_input(glob, batch_size, torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = {k: v.clone().requires_grad_(True) for k, v in g.items()}
    grads = torch.autograd.grad(distillation_loss(p, glob, teachers, x), list(p.values()))
    for (k, v), grad in zip(g.items(), grads):
        torch.testing.assert_close(new[k], v - 0.1 * grad, rtol=1e-12, atol=1e-12)

