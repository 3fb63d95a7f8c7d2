"""ImageNet backbones of the registry: parameter counts and outputs equal torchvision's / timm's own constructors,
MobileNetV1 follows mdistiller's layout, ``quantize_model`` converts ResNet-18 and the ViTs (Any-Precision and EMQ
settings), and ``parameter_roles`` finds every BatchNorm / LayerNorm affine parameter by type."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from lightning_methods.layers.quantized import QuantConv2d, QuantLinear, SwitchableBatchNorm, set_bits
from lightning_methods.models import available_backbones, create_backbone
from lightning_methods.models.imagenet_mobilenetv1 import BLOCKS
from lightning_methods.parameters import parameter_roles
from lightning_methods.quantization import quantize_model

TORCHVISION = {
    "imagenet_resnet18": torchvision.models.resnet18,
    "imagenet_resnet34": torchvision.models.resnet34,
    "imagenet_resnet50": torchvision.models.resnet50,
    "imagenet_mobilenetv2": torchvision.models.mobilenet_v2,
}
TIMM = {"imagenet_vit_s16": "vit_small_patch16_224", "imagenet_deit_tiny": "deit_tiny_patch16_224"}
ALL = [*TORCHVISION, *TIMM, "imagenet_mobilenetv1"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_are_registered_and_distinct_from_the_cifar_resnets():
    names = available_backbones()
    assert set(ALL) <= set(names)
    # the CIFAR ResNet-18 keeps its name and its 3x3 stem; the ImageNet one has torchvision's 7x7 stride-2 stem
    assert create_backbone("resnet18", 10).conv1.kernel_size == (3, 3)
    assert create_backbone("imagenet_resnet18", 10).conv1.kernel_size == (7, 7)


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_backbones_equal_torchvision(name):
    torch.manual_seed(0)
    ours, ref = create_backbone(name, 1000), TORCHVISION[name](weights=None, num_classes=1000)
    assert n_params(ours) == n_params(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())  # torchvision's ImageNet weights load unchanged
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, expected = ours(x), ref(x)
        feats = ours.forward_features(x)
    assert out.shape == (2, 1000)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same ops in the same order
    assert feats.shape == (2, ours.num_features)


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_backbones_equal_timm(name):
    ours = create_backbone(name, 1000)
    ref = timm.create_model(TIMM[name], pretrained=False, num_classes=1000)
    assert n_params(ours) == n_params(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    # a 64 px model (4x4 patch grid) computes exactly what timm's own 64 px model computes
    small = create_backbone(name, 10, img_size=64)
    ref_small = timm.create_model(TIMM[name], pretrained=False, num_classes=10, img_size=64)
    small.load_state_dict(ref_small.state_dict(), strict=True)
    small.eval(), ref_small.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, expected, feats = small(x), ref_small(x), small.forward_features(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert feats.shape == (2, small.num_features)


def test_mobilenetv1_layout_and_parameter_count():
    model = create_backbone("imagenet_mobilenetv1", 1000)
    # closed form: stem conv + BN, then per block depthwise 3x3 + BN and pointwise 1x1 + BN, then fc
    expected, c_in = 3 * 32 * 9 + 2 * 32, 32
    for c_out, _ in BLOCKS:
        expected += c_in * 9 + 2 * c_in + c_in * c_out + 2 * c_out
        c_in = c_out
    expected += 1024 * 1000 + 1000
    assert n_params(model) == expected == 4_231_976  # the published MobileNet-V1 1.0 count (4.2M)
    keys = model.state_dict()
    # mdistiller's parameter names: model.<i>.<j> (14 conv blocks) and fc
    assert {
        "model.0.0.weight",
        "model.0.1.running_mean",
        "model.13.0.weight",
        "model.13.3.weight",
        "model.13.4.bias",
        "fc.weight",
        "fc.bias",
    } <= set(keys)
    assert keys["model.1.0.weight"].shape == (32, 1, 3, 3)  # depthwise
    x = torch.randn(1, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        fmap = model.model[:-1](x)
        out = model(torch.randn(2, 3, 64, 64))
    assert fmap.shape == (1, 1024, 7, 7)  # total stride 32: mdistiller's AvgPool2d(7) window at 224 px
    assert out.shape == (2, 1000)


# ----------------------------------------------------------------------------------------------- quantization
def _distinct_per_row(w: torch.Tensor) -> int:
    rows = w.detach().reshape(w.shape[0], -1).sort(dim=1).values
    return int(((rows[:, 1:] != rows[:, :-1]).sum(dim=1) + 1).max())


SETTINGS = {"anyprecision": dict(shared_bn=False, wbc=False), "emq": dict(shared_bn=True, wbc=True)}
BITS = [1, 2, 4, 8, 32]


@pytest.mark.parametrize("method", list(SETTINGS))
def test_quantize_imagenet_resnet18(method):
    torch.manual_seed(0)
    model = create_backbone("imagenet_resnet18", 10)
    float_count = n_params(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_bn_params = 2 * sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    shortcut_bn = 2 * sum(model.get_submodule(f"layer{i}.0.downsample.1").num_features for i in (2, 3, 4))
    quantize_model(model, BITS, act_quant="unsigned", **SETTINGS[method])
    # Any-Precision keeps the stem and the classifier in float and the 1x1 shortcuts with float weights
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert isinstance(model.layer2[0].downsample[0], QuantConv2d) and not model.layer2[0].downsample[0].quantize_weights
    quant = [m for m in model.modules() if isinstance(m, QuantConv2d) and m.quantize_weights]
    assert len(quant) == 16  # 8 basic blocks x 2 3x3 convolutions
    switch = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm)]
    if method == "emq":  # one shared BN per site: the float model's parameter count
        assert not switch and n_params(model) == float_count
    else:  # one BN per trained bit-width, except the 3 shortcut BNs that stay plain
        assert len(switch) == n_bn - 3
        assert n_params(model) == float_count + (len(BITS) - 1) * (n_bn_params - shortcut_bn)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    outs = {}
    for b in BITS:
        set_bits(model, b)
        with torch.no_grad():
            outs[b] = model(x)
            w = model.layer1[0].conv1.quantized_weight()
        assert outs[b].shape == (2, 10) and torch.isfinite(outs[b]).all()
        if b < 32:  # per output channel (WBC is an affine map per channel) at most 2^b weight values
            assert _distinct_per_row(w) <= 2**b
    assert not torch.equal(outs[1], outs[32])


def test_quantize_imagenet_resnet50_bottlenecks():
    """ResNet-50 (bottleneck blocks, a 1x1 downsample in every stage's first block): 3 quantized convolutions per
    block, 4 float-weight downsample convolutions with plain BNs, float stem and classifier; forward at 2 / 32 bits."""
    model = quantize_model(create_backbone("imagenet_resnet50", 10), [2, 32], shared_bn=False)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    quant = [m for m in model.modules() if isinstance(m, QuantConv2d) and m.quantize_weights]
    shortcuts = [m for m in model.modules() if isinstance(m, QuantConv2d) and not m.quantize_weights]
    assert len(quant) == 3 * 16 and len(shortcuts) == 4
    assert all(type(model.get_submodule(f"layer{i}.0.downsample.1")) is nn.BatchNorm2d for i in (1, 2, 3, 4))
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        set_bits(model, 2)
        low = model(x)
        set_bits(model, 32)
        full = model(x)
    assert low.shape == full.shape == (1, 10) and torch.isfinite(low).all() and not torch.equal(low, full)


@pytest.mark.parametrize(
    ("name", "method"),
    [("imagenet_deit_tiny", "anyprecision"), ("imagenet_deit_tiny", "emq"), ("imagenet_vit_s16", "anyprecision")],
)  # ViT-S EMQ: same code, 4x the time
def test_quantize_imagenet_vit(name, method):
    torch.manual_seed(0)
    model = create_backbone(name, 10, img_size=32)
    float_count = n_params(model)
    quantize_model(model, BITS, act_quant="signed", **SETTINGS[method])
    # the patch embedding (first layer) and the head (last layer) stay in float; every attention / MLP Linear
    # (qkv, proj, fc1, fc2 of each of the 12 blocks) is quantized; LayerNorms are untouched (no BatchNorm to switch)
    assert type(model.patch_embed.proj) is nn.Conv2d and type(model.head) is nn.Linear
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 4 * 12 and all(n.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") for n in quant)
    assert n_params(model) == float_count
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    outs = {}
    for b in BITS:
        set_bits(model, b)
        with torch.no_grad():
            outs[b] = model(x)
            w = model.blocks[0].attn.qkv.quantized_weight()
        assert outs[b].shape == (2, 10) and torch.isfinite(outs[b]).all()
        if b < 32:
            assert _distinct_per_row(w) <= 2**b
    assert not torch.equal(outs[1], outs[32])


# ----------------------------------------------------------------------------------------------- SAM-ON roles
@pytest.mark.parametrize("name", ALL)
def test_parameter_roles_find_every_norm_affine_parameter(name):
    kwargs = {"img_size": 32} if name in TIMM else {}
    model = create_backbone(name, 10, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
    expected_layers = {
        "imagenet_resnet18": 20,
        "imagenet_resnet34": 36,
        "imagenet_resnet50": 53,
        "imagenet_mobilenetv2": 52,
        "imagenet_mobilenetv1": 27,
        "imagenet_vit_s16": 25,
        "imagenet_deit_tiny": 25,
    }[name]
    assert len(norms) == expected_layers  # BN per conv / LN: 2 per ViT block + the final one
    gammas = {id(m.weight) for m in norms}
    betas = {id(m.bias) for m in norms}
    roles = {id(p): r for p, r in parameter_roles(model).items()}
    assert {i for i, r in roles.items() if r == ("norm", True)} == gammas
    assert {i for i, r in roles.items() if r == ("norm", False)} == betas
    assert len(roles) == len(list(model.parameters()))


def test_parameter_roles_after_switchable_bn_conversion():
    model = quantize_model(create_backbone("imagenet_resnet18", 10), [2, 32], shared_bn=False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 17 + 3  # 17 switched sites x 2 bit-widths + 3 plain shortcut BNs
    norm_params = {id(p) for p, (role, _) in parameter_roles(model).items() if role == "norm"}
    assert norm_params == {id(p) for m in bns for p in (m.weight, m.bias)}
