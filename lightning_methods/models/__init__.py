"""Backbones for 32x32 inputs (and ImageNet-size ones named ``imagenet_*``) and ``create_backbone(name, num_classes)``.

Every backbone returns logits from ``forward`` and pooled features from ``forward_features``; ``num_features`` is
the width of those features. Exception: ``vit_lite_*`` (plain timm ``VisionTransformer``) return timm's token
sequence from ``forward_features``; their pooled features are ``forward_head(tokens, pre_logits=True)``.
Names are case-insensitive; the names of the shared CIFAR-100 distillation zoo
(``ResNet50``, ``wrn_40_2``, ``vgg13``, ...) are accepted as they are spelled there. Names this registry does not
know are created with timm (with a warning: timm models have ImageNet stems).
"""

from __future__ import annotations

import importlib
import pkgutil

from lightning_methods.models.cifar_resnet import CifarResNet
from lightning_methods.models.mobilenetv2 import MobileNetV2
from lightning_methods.models.registry import available_backbones, create_backbone, register_backbone
from lightning_methods.models.resnet import BasicBlock, Bottleneck, ResNet
from lightning_methods.models.shufflenetv1 import ShuffleNetV1
from lightning_methods.models.shufflenetv2 import ShuffleNetV2
from lightning_methods.models.vgg import VGG
from lightning_methods.models.wide_resnet50 import WideResNet50
from lightning_methods.models.wrn import WideResNet

# Every module of this package registers its backbones where they are defined; importing them all here fills the
# registry, so a new backbone is one new file (``register_backbone(...)`` at its bottom) and no edit of this file.
for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "MobileNetV2",
    "ResNet",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "VGG",
    "WideResNet",
    "WideResNet50",
    "available_backbones",
    "create_backbone",
    "register_backbone",
]
