"""Wide ResNet-50-2 (Zagoruyko & Komodakis, *Wide Residual Networks*, arXiv 1605.07146, in torchvision's bottleneck
form) with a CIFAR stem, as used by KOALA (arXiv 2107.03331) and KOALA++ (arXiv 2506.04432) on CIFAR-100.

It is torchvision's ``wide_resnet50_2`` (bottleneck blocks [3, 4, 6, 3], bottleneck width x2, stride on the 3x3
convolution) with the 7x7/stride-2 stem and its max-pool replaced by a 3x3/stride-1 convolution and no pooling
(official KOALA++ code, ``Task1_Image_Classification/models.py``). Parameter names are torchvision's (``conv1``,
``bn1``, ``layer1..4``, ``fc``), so ImageNet weights load except for ``conv1`` and ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.resnet import ResNet as TorchvisionResNet

from lightning_methods.models.registry import register_backbone


class WideResNet50(TorchvisionResNet):
    """WRN-50-2 for 32x32 inputs; ``forward`` returns logits, ``forward_features`` the pooled 2048-d features.

    Args:
        num_classes: size of the output layer.
        layers: bottleneck blocks per stage ([3, 4, 6, 3] for WRN-50-2; smaller lists give the same family).
        width_factor: bottleneck width multiplier (2 for WRN-50-2, 1 gives a torchvision ResNet-50).
        zero_init_residual: zero-initialize the last BatchNorm of every block (torchvision option, off by default).
    """

    def __init__(self, num_classes: int = 100, layers: tuple[int, ...] | list[int] = (3, 4, 6, 3),
                 width_factor: int = 2, zero_init_residual: bool = False) -> None:
        super().__init__(Bottleneck, list(layers), num_classes=num_classes, width_per_group=64 * width_factor,
                         zero_init_residual=zero_init_residual)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        self.num_features = self.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


# KOALA / KOALA++ CIFAR-100 backbone: torchvision's Wide ResNet-50-2 with a CIFAR stem
register_backbone("wrn_50_2", WideResNet50)
