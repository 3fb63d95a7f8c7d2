"""Backbones for 32x32 inputs and ``create_backbone(name, num_classes)``.

Every backbone returns logits from ``forward`` and pooled features from ``forward_features``; ``num_features`` is
the width of those features. Names are case-insensitive; the names of the shared CIFAR-100 distillation zoo
(``ResNet50``, ``wrn_40_2``, ``vgg13``, ...) are accepted as they are spelled there. Names this registry does not
know are created with timm (with a warning: timm models have ImageNet stems).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

from torch import nn

from .cifar_resnet import CifarResNet
from .resnet import BasicBlock, Bottleneck, ResNet
from .vgg import CONFIGS as VGG_CONFIGS
from .vgg import VGG
from .wrn import WideResNet

BackboneFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str, factory: BackboneFactory) -> None:
    """Add ``factory(num_classes=..., **kwargs) -> nn.Module`` under ``name`` (case-insensitive)."""
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[key] = factory


def available_backbones() -> list[str]:
    """Names ``create_backbone`` builds itself (timm names work too, with a warning)."""
    return sorted(_REGISTRY)


def create_backbone(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a backbone by name.

    Args:
        name: a registered name (see ``available_backbones()``), else a timm model name.
        num_classes: size of the classification layer.
        **kwargs: passed to the backbone constructor (e.g. ``drop_rate`` for WideResNets).

    Raises:
        ValueError: if neither this registry nor timm knows ``name``; the message lists the known names.
    """
    factory = _REGISTRY.get(name.lower())
    if factory is not None:
        return factory(num_classes=num_classes, **kwargs)
    import timm

    if timm.is_model(name):
        warnings.warn(
            f"backbone {name!r} is not a CIFAR backbone of lightning-methods; creating it with timm. timm models have "
            "ImageNet stems (stride-4 stem with max-pool) that lose accuracy on 32x32 inputs "
            "(e.g. ResNet-34 59.8% vs 75.9% on CIFAR-100, timm #2481). "
            f"CIFAR backbones: {', '.join(available_backbones())}",
            stacklevel=2,
        )
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    raise ValueError(
        f"unknown backbone {name!r}: it is neither a lightning-methods CIFAR backbone nor a timm model. "
        f"Known CIFAR backbones: {', '.join(available_backbones())} (or any name in timm.list_models())."
    )


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_backbone(f"resnet{_depth}", partial(CifarResNet, _depth, (16, 16, 32, 64)))
register_backbone("resnet8x4", partial(CifarResNet, 8, (32, 64, 128, 256)))
register_backbone("resnet32x4", partial(CifarResNet, 32, (32, 64, 128, 256)))
register_backbone("resnet18", partial(ResNet, BasicBlock, [2, 2, 2, 2]))
register_backbone("resnet34", partial(ResNet, BasicBlock, [3, 4, 6, 3]))
register_backbone("resnet50", partial(ResNet, Bottleneck, [3, 4, 6, 3]))
for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10)):
    register_backbone(f"wrn_{_d}_{_k}", partial(WideResNet, _d, _k))
for _name, _cfg in VGG_CONFIGS.items():
    register_backbone(_name, partial(VGG, _cfg))

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ResNet",
    "VGG",
    "WideResNet",
    "available_backbones",
    "create_backbone",
    "register_backbone",
]

# CIFAR-100 distillation zoo students (mdistiller names; see lightning_methods/distillation.py)
from .mobilenetv2 import MobileNetV2  # noqa: E402
from .shufflenetv1 import ShuffleNetV1  # noqa: E402
from .shufflenetv2 import ShuffleNetV2  # noqa: E402

register_backbone("MobileNetV2", partial(MobileNetV2, expansion=6, width_mult=0.5))
register_backbone("mobile_half", partial(MobileNetV2, expansion=6, width_mult=0.5))
register_backbone("ShuffleV1", ShuffleNetV1)
register_backbone("ShuffleV2", partial(ShuffleNetV2, width=1.0))
__all__ += ["MobileNetV2", "ShuffleNetV1", "ShuffleNetV2"]

# KOALA / KOALA++ CIFAR-100 backbone: torchvision's Wide ResNet-50-2 with a CIFAR stem
from .wide_resnet50 import WideResNet50  # noqa: E402

register_backbone("wrn_50_2", WideResNet50)
__all__ += ["WideResNet50"]
