"""Backbones: published parameter counts, shapes, parameter roles by module type, name errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_methods import ImageClassifier, available_backbones, create_backbone, param_groups_by_role
from lightning_methods.parameters import NORM_TYPES

# Parameter counts (millions, CIFAR-100 head) as published: WRN paper (36.5M for WRN-28-10), the CRD / DKD tables of
# the KD literature for the CIFAR zoo (resnet20 0.28M with 1x1-conv projection shortcuts; the 0.27M of He et al. is
# the CIFAR-10, identity-shortcut variant), kuangliu/pytorch-cifar for ResNet-18/34/50.
PUBLISHED_M = {
    "resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.74, "resnet8x4": 1.23, "resnet32x4": 7.43,
    "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26, "wrn_28_10": 36.5, "vgg8": 3.96, "vgg13": 9.46,
    "resnet18": 11.22, "resnet34": 21.33, "resnet50": 23.71,
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_count_matches_published(name):
    published = PUBLISHED_M[name]
    decimals = 1 if published > 30 else 2
    # within one unit of the last published digit (tables round or truncate)
    assert abs(n_params(create_backbone(name, 100)) / 1e6 - published) < 10**-decimals


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8"])
def test_forward_shapes(name):
    m = create_backbone(name, 7)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert m.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, m.num_features)


def test_names_are_case_insensitive_and_zoo_spellings_work():
    assert type(create_backbone("ResNet50", 10)).__name__ == "ResNet"
    assert type(create_backbone("WRN_40_2", 10)).__name__ == "WideResNet"


def test_unknown_backbone_lists_the_known_names():
    with pytest.raises(ValueError) as err:
        create_backbone("resnet_does_not_exist", 10)
    assert "resnet8x4" in str(err.value) and "wrn_28_10" in str(err.value)


def test_timm_fallback_warns_about_imagenet_stems():
    with pytest.warns(UserWarning, match="ImageNet stems"):
        m = create_backbone("resnet10t", 10)
    assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def _expected_norm_affine(model: nn.Module) -> tuple[set[int], set[int]]:
    scales, shifts = set(), set()
    for mod in model.modules():
        if isinstance(mod, NORM_TYPES) and getattr(mod, "weight", None) is not None:
            scales.add(id(mod.weight))
            shifts.add(id(mod.bias))
    return scales, shifts


@pytest.mark.parametrize("name", available_backbones())
def test_norm_role_holds_exactly_the_norm_affine_parameters(name):
    model = create_backbone(name, 10)
    groups = param_groups_by_role(model)
    got_scale = {id(p) for g in groups if g["role"] == "norm" and g["scale"] for p in g["params"]}
    got_shift = {id(p) for g in groups if g["role"] == "norm" and not g["scale"] for p in g["params"]}
    scales, shifts = _expected_norm_affine(model)
    has_norm = any(isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None for m in model.modules())
    assert got_scale == scales and got_shift == shifts and bool(scales) == has_norm  # plain CNNs/MLPs have none
    # every parameter appears in exactly one group
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    biases = {id(p) for g in groups if g["role"] == "bias" for p in g["params"]}
    assert all(p.ndim == 1 for p in model.parameters() if id(p) in biases)


def test_roles_found_by_type_not_name():
    """A BatchNorm called 'downsample.1' and a Linear called 'norm' get the right roles."""
    model = nn.Sequential()
    model.add_module("downsample", nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    model.add_module("norm", nn.Linear(4, 2))
    model.add_module("ln", nn.LayerNorm(2))
    groups = {(g["role"], g.get("scale")): g["params"] for g in param_groups_by_role(model)}
    assert groups[("norm", True)] == [model.downsample[1].weight, model.ln.weight]
    assert groups[("norm", False)] == [model.downsample[1].bias, model.ln.bias]
    assert groups[("weight", None)] == [model.downsample[0].weight, model.norm.weight]
    assert groups[("bias", None)] == [model.downsample[0].bias, model.norm.bias]




def test_roles_of_shared_frozen_and_affine_free_parameters():
    """A tied parameter is grouped once (the role of its first owner), frozen parameters are left out (also half of a
    norm layer), a BatchNorm without affine parameters contributes nothing, and every torch norm family gives its
    gamma to the scale group and its beta to the shift group."""
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight  # tied weights
    half = nn.BatchNorm1d(4)
    half.weight.requires_grad_(False)
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    norms = [nn.LayerNorm(4, bias=False), nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True), nn.RMSNorm(4)]
    model = nn.Sequential(emb, head, nn.BatchNorm1d(4, affine=False), half, frozen, *norms)
    groups = {(g["role"], g.get("scale")): g["params"] for g in param_groups_by_role(model)}
    assert groups == {("weight", None): [emb.weight],
                      ("norm", True): [norms[0].weight, norms[1].weight, norms[2].weight, norms[3].weight],
                      ("norm", False): [half.bias, norms[1].bias, norms[2].bias]}

def test_every_timm_norm_layer_has_the_norm_role():
    """timm's norm layers that subclass no torch norm (RmsNormFp32, SimpleNorm, SimpleNorm2d, ...: the gamma of
    RMS-normalized ViTs) are norm layers too: their gamma is a norm scale, not a "bias" (SAM-ON, ASAM and weight-decay
    exclusions select by role)."""
    import inspect

    import timm.layers.norm
    import timm.layers.norm_act

    checked = 0
    for module in (timm.layers.norm, timm.layers.norm_act):
        for name, cls in vars(module).items():
            if not (inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == module.__name__):
                continue
            try:
                layer = cls(32)
            except TypeError:
                continue
            params = dict(layer.named_parameters(recurse=False))
            if not params:
                continue  # frozen statistics only
            roles = param_groups_by_role(nn.Sequential(nn.Linear(32, 32), layer))
            got = {(g["role"], g.get("scale")): g["params"] for g in roles}
            assert got[("norm", True)] == [params["weight"]], name
            assert got.get(("norm", False), []) == ([params["bias"]] if "bias" in params else []), name
            assert {r for r, _ in got} == {"weight", "bias", "norm"}, name  # the Linear's weight and bias
            checked += 1
    assert checked >= 20  # timm 1.0.22 and later have this many norm layers with an affine scale

def test_no_weight_decay_roles():
    model = create_backbone("resnet8", 10)
    groups = param_groups_by_role(model, weight_decay=5e-4, no_weight_decay_roles=["norm", "bias"])
    assert {g["role"]: g["weight_decay"] for g in groups} == {"weight": 5e-4, "bias": 0.0, "norm": 0.0}
    with pytest.raises(ValueError, match="roles are"):
        param_groups_by_role(nn.Linear(2, 2), no_weight_decay_roles=["gamma"])
    model = ImageClassifier("resnet8", 10, no_weight_decay_roles=["norm"])
    opt = model.configure_optimizers()
    assert [g["weight_decay"] for g in opt.param_groups if g["role"] == "norm"] == [0.0, 0.0]
    assert [g["weight_decay"] for g in opt.param_groups if g["role"] == "weight"] == [5e-4]
