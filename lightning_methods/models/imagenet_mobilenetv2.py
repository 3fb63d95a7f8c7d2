"""torchvision's ImageNet MobileNetV2 (Sandler et al., *MobileNetV2: Inverted Residuals and Linear Bottlenecks*,
arXiv 1801.04381) in the backbone registry as ``imagenet_mobilenetv2`` (the CIFAR zoo's ``mobilenetv2`` is the
half-width mdistiller student).

It is ``torchvision.models.MobileNetV2`` (weights=None: no download), so parameter names and counts equal
torchvision's and its ImageNet weights load with ``strict=True``; ``forward_features`` (pooled 1280-d features) and
``num_features`` are added.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2 as TorchvisionMobileNetV2

from lightning_methods.models.registry import register_backbone


class ImageNetMobileNetV2(TorchvisionMobileNetV2):
    """torchvision's MobileNetV2 with ``forward_features``.

    Args:
        num_classes: size of the classification layer (1000 for ImageNet-1k).
        width_mult: channel multiplier (1.0 is the standard model).
        dropout: dropout before the classifier (torchvision default 0.2).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__(num_classes=num_classes, width_mult=width_mult, dropout=dropout)
        self.num_features = self.last_channel

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


register_backbone("imagenet_mobilenetv2", ImageNetMobileNetV2)
