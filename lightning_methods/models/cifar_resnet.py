"""CIFAR ResNets of He et al. (arXiv 1512.03385, section 4.2) in the layout used by the distillation literature.

resnet8 ... resnet110 use 16-16-32-64 filters; resnet8x4 / resnet32x4 use 32-64-128-256 filters (CRD, arXiv
1910.10699; mdistiller). 3x3 stem, no max-pool, three stages with strides 1, 2, 2, 1x1-conv + BN projection
shortcuts (option B), global average pooling, one linear layer. Parameter names (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.{conv,bn}{1,2}``, ``downsample.{0,1}``, ``fc``) equal the widely shared CIFAR-100 teacher
checkpoints, so those load with ``strict=True``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lightning_methods.models.registry import register_backbone


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual connection.

    ``downsample`` projects the input when the shapes differ; without one, a 1x1 conv + BN is built (mdistiller's
    option B). The HPN ResNet passes its own (the official 3x3 stride-2 shortcut).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if downsample is None and (stride != 1 or inplanes != planes):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class ThreeStageResNet(nn.Module):
    """The forward pass shared by the 6n + 2 CIFAR ResNets: stem (``conv1``, ``bn1``, ``relu``), ``layer1..3``,
    ``avgpool`` and the linear head ``fc``, which subclasses build (also :class:`~.hpn_resnet.HPNResNet`)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class CifarResNet(ThreeStageResNet):
    """ResNet with depth = 6n + 2 basic blocks for 32x32 inputs.

    Args:
        depth: total depth, 6n + 2 (8, 14, 20, 32, 44, 56, 110).
        filters: stem width followed by the widths of the three stages.
        num_classes: size of the output layer.
    """

    def __init__(self, depth: int, filters: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (e.g. 20, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = filters[0]
        self.conv1 = nn.Conv2d(3, filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(filters[1], n, 1)
        self.layer2 = self._make_layer(filters[2], n, 2)
        self.layer3 = self._make_layer(filters[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters[3], num_classes)
        self.num_features = filters[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_backbone(f"resnet{_depth}", partial(CifarResNet, _depth, (16, 16, 32, 64)))
register_backbone("resnet8x4", partial(CifarResNet, 8, (32, 64, 128, 256)))
register_backbone("resnet32x4", partial(CifarResNet, 32, (32, 64, 128, 256)))
