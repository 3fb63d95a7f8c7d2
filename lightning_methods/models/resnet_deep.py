"""ResNet-101 / ResNet-152 (He et al., "Deep Residual Learning for Image Recognition", arXiv 1512.03385) with the
CIFAR stem of :mod:`.resnet` (3x3 conv, stride 1, no max-pool): the deep members of FedFree's / HtFLlib's
``HtFE-img-8`` client family.

They reuse :class:`~lightning_methods.models.resnet.ResNet` and its ``Bottleneck`` (stride on the 3x3 conv, as
torchvision's v1.5), with [3, 4, 23, 3] and [3, 8, 36, 3] blocks: 42.49M and 58.14M parameters without the
classifier (torchvision's ImageNet-stem models: 42.50M and 58.14M).
"""

from __future__ import annotations

from functools import partial

from lightning_methods.models.registry import register_backbone
from lightning_methods.models.resnet import Bottleneck, ResNet

register_backbone("resnet101", partial(ResNet, Bottleneck, [3, 4, 23, 3]))
register_backbone("resnet152", partial(ResNet, Bottleneck, [3, 8, 36, 3]))
