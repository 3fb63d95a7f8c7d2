"""Quantizers, weight bias correction, conversion of backbones, switchable / shared BatchNorm and recalibration."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from lightning_methods.layers import (
    QuantConv2d,
    QuantLinear,
    SwitchableBatchNorm,
    multibit_modules,
    quantize_activation,
    quantize_weight,
    set_bits,
    weight_bias_correction,
)
from lightning_methods.models import create_backbone
from lightning_methods.quantization import bn_stats, load_bn_stats, quantize_model, recalibrate_bn

from helpers import TinyNet

LOW_BITS = [1, 2, 4, 8]


@pytest.mark.parametrize("bits", LOW_BITS)
def test_weight_quantizer_levels_and_ste(bits):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits), requires_grad=True)
    q = quantize_weight(w, bits)
    assert q.unique().numel() <= 2**bits
    q.sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    scale = w.detach().abs().mean()  # q = (2 level - 1) E with level on the k-bit grid
    levels = ((q.detach() / scale + 1) / 2) * (2**bits - 1)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bits", LOW_BITS)
def test_activation_quantizer_grid_and_ste(bits):
    x = torch.linspace(-1, 2, 301, requires_grad=True)
    a = quantize_activation(x, bits)
    grid = torch.arange(2**bits) / (2**bits - 1)
    assert torch.isin(a.detach(), grid).all()
    a.sum().backward()  # STE inside the clamp range, zero outside
    inside, outside = (x > 0) & (x < 1), (x < 0) | (x > 1)
    assert (x.grad[inside] == 1).all() and (x.grad[outside] == 0).all()
    signed = quantize_activation(x.detach(), bits, "signed")
    assert torch.isin(signed, 2 * grid - 1).all()
    assert torch.equal(quantize_activation(x.detach(), 32), x.detach())
    assert torch.equal(quantize_activation(x.detach(), 32, clamp_full_precision=True), x.detach().clamp(0, 1))


@pytest.mark.parametrize("bits", [*LOW_BITS, 32])
def test_wbc_matches_float_channel_moments(bits):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = weight_bias_correction(quantize_weight(w, bits), w)
    std, mean = torch.std_mean(out.detach(), dim=(1, 2, 3), correction=0)
    w_std, w_mean = torch.std_mean(w.detach(), dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(mean, w_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(std, w_std, rtol=0, atol=1e-5)
    out.pow(2).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    if bits == 1:  # an affine map of the sign per channel: two values per output channel
        assert all(row.unique().numel() <= 2 for row in out.detach().flatten(1))


def test_wbc_identity_and_ratio_clamp():
    w = torch.randn(4, 5)
    torch.testing.assert_close(weight_bias_correction(w, w), w, rtol=0, atol=1e-6)
    constant = torch.ones(1, 5)  # std(Q) = 0: eps keeps it finite, the clamp bounds the ratio
    w1 = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    assert torch.isfinite(weight_bias_correction(constant, w1)).all()
    q = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1e-3]])
    clamped = weight_bias_correction(q, w1, max_ratio=2.0)
    assert (clamped - clamped.mean()).abs().max() <= 2.0 * 1e-3
    with pytest.raises(ValueError, match="one shape"):
        weight_bias_correction(torch.zeros(2, 3), torch.zeros(3, 2))


def test_quantized_layers_share_parameters_and_switch():
    conv, lin = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)
    qc, ql = QuantConv2d.from_float(conv, wbc=True), QuantLinear.from_float(lin, act_quant="signed")
    assert qc.weight is conv.weight and qc.bias is conv.bias and ql.weight is lin.weight
    model = nn.Sequential(qc, nn.Flatten(2), nn.Identity())
    assert set_bits(model, 4) == 32 and qc.bits == 4
    x = torch.rand(2, 3, 5, 5)
    assert not torch.equal(qc(x), conv(x))
    set_bits(model, 32)
    qc.wbc = False
    weight = torch.tanh(conv.weight) / torch.tanh(conv.weight).abs().max() * conv.weight.abs().mean()
    torch.testing.assert_close(qc(x), nn.functional.conv2d(x, weight, conv.bias, padding=1))


@pytest.mark.parametrize("bad", [0, 33, -1, 2.5, True])
def test_bit_widths_outside_1_to_32_are_refused(bad):
    model = quantize_model(create_backbone("preact_resnet8", 10, width=0.25), [1, 32])
    with pytest.raises(ValueError, match="1..32"):
        set_bits(model, bad)
    with pytest.raises(ValueError, match="1..32"):
        quantize_model(create_backbone("preact_resnet8", 10, width=0.25), [2, bad])


def test_shared_bn_keeps_parameter_count_and_switching_changes_no_parameter():
    float_model = create_backbone("preact_resnet8", 10, width=0.5)
    n_float = sum(p.numel() for p in float_model.parameters())
    model = quantize_model(create_backbone("preact_resnet8", 10, width=0.5), [1, 2, 4, 8, 32], shared_bn=True, wbc=True)
    assert sum(p.numel() for p in model.parameters()) == n_float
    assert not any(isinstance(m, SwitchableBatchNorm) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in float_model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bits in (1, 3, 8, 32):
        set_bits(model, bits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_switchable_bn_has_one_bn_per_trained_bit_and_fallback():
    model = quantize_model(create_backbone("preact_resnet8", 10, width=0.25), [1, 4, 32], shared_bn=False)
    switch = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm)]
    assert len(switch) == 7 and all(sorted(m.bn_dict) == ["1", "32", "4"] for m in switch)  # 3 blocks x 2 + final
    assert isinstance(model.layers[1].skip_bn, nn.BatchNorm2d)  # the shortcut BN stays plain
    bn = switch[0]
    assert [bn.owner_bits(b) for b in (1, 2, 3, 4, 5, 32)] == [1, 4, 4, 4, 32, 32]


@pytest.mark.parametrize("name", ["resnet18", "wrn_16_2", "resnet20", "resnet20x5"])
def test_package_backbones_convert(name, one_thread):
    model = quantize_model(create_backbone(name, 10), [2, 32])
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert type(convs[0][1]) is nn.Conv2d and type(convs[-1][1]) is nn.Linear  # stem and classifier stay float
    quantized = [m for _, m in convs if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(quantized) == len(convs) - 2
    shortcuts = [m for n, m in convs if n.endswith(("shortcut.0", "downsample.0", "convShortcut", "skip_conv"))]
    assert shortcuts and all(not m.quantize_weights for m in shortcuts)
    set_bits(model, 2)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_model_without_hidden_layers_is_refused():
    with pytest.raises(ValueError, match="no layer left to quantize.*conv, fc"):
        quantize_model(TinyNet(), [1, 32])


def test_timm_vit_linear_layers_convert(one_thread):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    model = quantize_model(vit, [4, 32], act_quant="signed", wbc=True)
    assert type(model.patch_embed.proj) is nn.Conv2d and type(model.head) is nn.Linear
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear) and isinstance(model.blocks[1].mlp.fc2, QuantLinear)
    assert len(multibit_modules(model)) == 2 * 4
    set_bits(model, 4)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.skipif(importlib.util.find_spec("lightning_methods.models.vit") is None,
                    reason="lightning_methods/models/vit.py (vit_lite_7_4) is not in the tree yet")
def test_package_vit_converts(one_thread):
    vit = create_backbone("vit_lite_7_4", 10, embed_dim=32, depth=2, num_heads=2)  # narrow and shallow: fast
    model = quantize_model(vit, [4, 32], act_quant="signed")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 4
    assert type(model.patch_embed.proj) is nn.Conv2d and type(model.head) is nn.Linear
    set_bits(model, 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_recalibration_is_the_cumulative_mean_of_pre_bn_activations():
    torch.manual_seed(0)
    model = quantize_model(create_backbone("preact_resnet8", 10, width=0.25), [1, 4, 32], shared_bn=False)
    bn = model.layers[1].bn0
    batches = [torch.randn(6, 3, 8, 8) for _ in range(3)]
    seen = []
    hook = bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    others = {b: bn.bn_dict[b].running_mean.clone() for b in ("1", "32")}
    assert recalibrate_bn(model.train(False), 4, iter(batches), n_batches=3) == 18
    hook.remove()
    target = bn.bn_dict["4"]
    means = torch.stack([s.mean(dim=(0, 2, 3)) for s in seen])
    variances = torch.stack([s.transpose(0, 1).flatten(1).var(dim=1) for s in seen])
    torch.testing.assert_close(target.running_mean, means.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(target.running_var, variances.mean(0), rtol=0, atol=1e-5)
    assert all(torch.equal(bn.bn_dict[b].running_mean, v) for b, v in others.items())  # other bits untouched
    assert not model.training and model.layers[0].conv0.bits == 32 and target.momentum == 0.1  # all restored


def test_bn_stats_bank_round_trip():
    model = quantize_model(create_backbone("preact_resnet8", 10, width=0.25), [1, 32])
    saved = bn_stats(model)
    recalibrate_bn(model, 1, [torch.randn(4, 3, 8, 8)], 1)
    assert not all(torch.equal(a, b) for a, b in zip(saved, bn_stats(model)))
    load_bn_stats(model, saved)
    assert all(torch.equal(a, b) for a, b in zip(saved, bn_stats(model)))
    with pytest.raises(ValueError, match="BatchNorm statistics"):
        load_bn_stats(model, saved[:-1])


@pytest.mark.parametrize("bits", [*LOW_BITS, 32])
def test_wbc_layer_forward_uses_the_corrected_weights(bits):
    """Spec (WBC): applied after de-quantization, inside the forward pass, at every bit-width (32 included): the
    layer computes conv(q_a(x), WBC(q_b(W), W)), and the weight it uses has W's per-output-channel mean and std."""
    torch.manual_seed(bits)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False).double()
    layer = QuantConv2d.from_float(conv, wbc=True)
    set_bits(nn.Sequential(layer), bits)
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64) * 1.5 - 0.25  # inside and outside the [0, 1] clamp
    w = conv.weight.detach()
    a, corrected = quantize_activation(x, bits), weight_bias_correction(quantize_weight(w, bits), w)
    expected = nn.functional.conv2d(a, corrected, padding=1)
    # float64 sums of 72 products: |error| <= 72 eps64 sum_j |a_j w_j| (first order), per output
    eps = torch.finfo(torch.float64).eps
    bound = 72 * eps * nn.functional.conv2d(a.abs(), corrected.abs(), padding=1).max().item()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=bound)
    used = layer.quantized_weight().detach()
    std, mean = torch.std_mean(used, dim=(1, 2, 3), correction=0)
    w_std, w_mean = torch.std_mean(w, dim=(1, 2, 3), correction=0)
    q_std = torch.std(quantize_weight(w, bits), dim=(1, 2, 3), correction=0)
    # centring, scaling and shifting 72 values, then their mean: a few roundings of size eps64 max|Q~| each
    torch.testing.assert_close(mean, w_mean, rtol=0, atol=4 * 72 * eps * used.abs().max().item())
    # std(Q~) = std(Q) std(W) / (std(Q) + eps): relative deficit eps / (std(Q) + eps) < 1e-8 / min std(Q)
    assert ((std - w_std).abs() / w_std).max().item() <= 1e-8 / q_std.min().item() + 1e-14
    layer.wbc = False  # without WBC the channel moments are the quantizer's, not W's
    assert not torch.allclose(torch.std_mean(layer.quantized_weight().detach(), dim=(1, 2, 3), correction=0)[0], w_std)
