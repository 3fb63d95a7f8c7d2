"""The backbone zoo: every registered backbone's forward contract, the forward semantics of the
distillation zoo against mdistiller's definitions (written here functionally, from the state dict), and the parameter
counts printed in the client-family docstring."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from lightning_methods.models import available_backbones, create_backbone, fed_clients


def _input_size(name: str) -> int:
    return 224 if name.startswith("imagenet_") else 64 if name == "vit_lite_7_8" else 32


@pytest.mark.parametrize("name", available_backbones())
def test_every_backbone_forward_contract(name):
    """Logits (N, classes) from ``forward``; pooled (N, num_features) features from ``forward_features`` (ViT-Lite:
    timm's token sequence, pooled by ``forward_head(pre_logits=True)``). Shapes only, on the meta device."""
    size = _input_size(name)
    with torch.device("meta"):
        model = create_backbone(name, 7).eval()
        x = torch.empty(2, 3, size, size)
        out, feats = model(x), model.forward_features(x)
        if name.startswith("vit_lite_"):
            assert feats.shape == (2, 1 + (size // model.patch_embed.patch_size[0]) ** 2, model.num_features)
            feats = model.forward_head(feats, pre_logits=True)
    assert out.shape == (2, 7)
    assert feats.shape == (2, model.num_features)


# ------------------------------------------------------------- mdistiller forward semantics, from the state dict
def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)


def _conv(x, sd, p, stride=1):
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd.get(f"{p}.bias"), stride, w.shape[-1] // 2)


def ref_cifar_resnet(x, sd):
    """mdistiller ``resnet.py``: post-activation blocks, 1x1-conv + BN projection, ReLU after the sum."""
    x = F.relu(_bn(_conv(x, sd, "conv1"), sd, "bn1"))
    for s in (1, 2, 3):
        i = 0
        while f"layer{s}.{i}.conv1.weight" in sd:
            p, stride = f"layer{s}.{i}", 2 if s > 1 and i == 0 else 1
            out = F.relu(_bn(_conv(x, sd, f"{p}.conv1", stride), sd, f"{p}.bn1"))
            out = _bn(_conv(out, sd, f"{p}.conv2"), sd, f"{p}.bn2")
            res = x if f"{p}.downsample.0.weight" not in sd else _bn(
                _conv(x, sd, f"{p}.downsample.0", stride), sd, f"{p}.downsample.1")
            x, i = F.relu(out + res), i + 1
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def ref_wrn(x, sd):
    """mdistiller ``wrn.py``: pre-activation blocks; the projection reads the pre-activated input, the identity the
    raw input; final BN + ReLU."""
    x = _conv(x, sd, "conv1")
    for b in (1, 2, 3):
        i = 0
        while f"block{b}.layer.{i}.conv1.weight" in sd:
            p, stride = f"block{b}.layer.{i}", 2 if b > 1 and i == 0 else 1
            o = F.relu(_bn(x, sd, f"{p}.bn1"))
            short = _conv(o, sd, f"{p}.convShortcut", stride) if f"{p}.convShortcut.weight" in sd else x
            out = F.relu(_bn(_conv(o, sd, f"{p}.conv1", stride), sd, f"{p}.bn2"))
            x, i = short + _conv(out, sd, f"{p}.conv2"), i + 1
    x = F.relu(_bn(x, sd, "bn1"))
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def ref_vgg(x, sd):
    """mdistiller ``vgg.py`` at 32x32: conv(bias) + BN with ReLU between, ReLU after each block, max-pool after
    blocks 0-2 (block 3's pool only for 64x64 inputs), global average pooling, one linear layer."""
    for b in range(5):
        j = 0
        while f"block{b}.{3 * j}.weight" in sd:
            x = x if j == 0 else F.relu(x)
            x, j = _bn(_conv(x, sd, f"block{b}.{3 * j}"), sd, f"block{b}.{3 * j + 1}"), j + 1
        x = F.relu(x)
        x = F.max_pool2d(x, 2) if b < 3 else x
    return F.linear(x.mean((2, 3)), sd["classifier.weight"], sd["classifier.bias"])


@pytest.mark.parametrize(("name", "ref"), [("resnet8", ref_cifar_resnet), ("resnet8x4", ref_cifar_resnet),
                                           ("resnet14", ref_cifar_resnet), ("wrn_16_1", ref_wrn),
                                           ("wrn_16_2", ref_wrn), ("vgg8", ref_vgg), ("vgg11", ref_vgg)])
def test_zoo_forward_equals_mdistiller_semantics(name, ref):
    """Same names and shapes are not enough for a teacher file to give the teacher's logits: the forward pass must
    also be mdistiller's (ReLU placement, which input a projection reads, pooling)."""
    torch.manual_seed(0)
    model = create_backbone(name, 10).eval()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x), ref(x, model.state_dict()), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- client-family docstring counts
def test_fed_clients_docstring_counts_match_the_models():
    """The table of ``models/fed_clients.py`` prints each family's parameter count (100 classes, CIFAR stem, two
    decimals); ``lightning-methods list`` prints the same rounded counts."""
    doc = fed_clients.__doc__
    rows = re.findall(r"^``(fed\w+)``\s.*?\s(\d+\.\d\d)M(?: \[|$)", doc, flags=re.M)
    pairs = re.search(r"``fed_resnet8`` / ``fed_resnet20``.*?; (\d+\.\d\d)M / (\d+\.\d\d)M\)", doc, flags=re.S)
    assert len(rows) == 9 and pairs is not None
    documented = dict(rows) | {"fed_resnet8": pairs.group(1), "fed_resnet20": pairs.group(2)}
    assert sorted(documented) == fed_clients.client_families()
    for name, shown in documented.items():
        with torch.device("meta"):
            count = sum(p.numel() for p in create_backbone(name, 100).parameters())
        assert f"{count / 1e6:.2f}" == shown, (name, count)
