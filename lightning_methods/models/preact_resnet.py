"""Pre-activation CIFAR ResNets in the layout of Any-Precision DNNs (ResNet-20 with width x5 is their CIFAR model).

Yu, Li, Shi, Huang, Hua. *Any-Precision Deep Neural Networks*. arXiv 1911.07346; official code
SHI-Labs/Any-Precision-DNNs (``models/resnet_quan.py``). This is the *float* network: the multi-bit version is made by
``lightning_methods.quantization.quantize_model`` (quantized 3x3 convolutions, activation quantizers at their
inputs, switchable or shared BatchNorm), which reproduces the official ``resnet20q`` exactly.

Layout (official): a float 3x3 stem ``conv0`` (16w channels), ``(depth - 2) / 6`` pre-activation blocks per stage
(``bn0 -> ReLU -> conv0 -> bn1 -> ReLU -> conv1`` plus the shortcut), stages of 16w / 32w / 64w channels with stride
1 / 2 / 2, a 1x1 ``skip_conv`` + ``skip_bn`` projection where the stride is 2 (it reads the pre-activated input), a
final ``bn``, global average pooling and ``fc``. As in the official model there is no ReLU after the final ``bn``
and PyTorch's default initialization is kept. Parameter names equal the official ones, so the converted model
loads the official checkpoints' ``state_dict`` with ``strict=True``.

Registered names: ``resnet20x5`` (Any-Precision's CIFAR model, 80/160/320 channels), ``preact_resnet20`` and
``preact_resnet8`` (width 1, 16/32/64 channels: cheap versions for demos and tests).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lightning_methods.models.registry import register_backbone


class PreActBlock(nn.Module):
    """Pre-activation basic block; the projection shortcut (stride 2) reads the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_planes)
        self.act0 = nn.ReLU()
        self.conv0 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.skip_conv = None
        if stride != 1 or in_planes != planes:
            self.skip_conv = nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
            self.skip_bn = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act0(self.bn0(x))
        shortcut = x if self.skip_conv is None else self.skip_bn(self.skip_conv(out))
        out = self.conv1(self.act1(self.bn1(self.conv0(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with depth 6n + 2 for 32x32 inputs (Any-Precision's CIFAR layout).

    Args:
        depth: total depth, 6n + 2 (20 for Any-Precision's model; 8 for a cheap version).
        width: channel multiplier w (stages of 16w, 32w, 64w channels; 5 for Any-Precision's ResNet-20x5). A
            fraction (e.g. 0.5) makes tiny test models.
        num_classes: size of the output layer.
    """

    def __init__(self, depth: int = 20, width: float = 5, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"pre-activation ResNet depth must be 6n + 2 with n >= 1 (e.g. 8, 20, 56), got {depth}")
        if width <= 0 or int(16 * width) < 1:
            raise ValueError(f"width must give at least one channel (16 * width >= 1), got {width}")
        n = (depth - 2) // 6
        channels = [int(16 * width), int(32 * width), int(64 * width)]
        self.conv0 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.layers = nn.ModuleList()
        in_planes = channels[0]
        for stage, planes in enumerate(channels):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                self.layers.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv0(x)
        for layer in self.layers:
            out = layer(out)
        return self.bn(out).mean(dim=2).mean(dim=2)  # the official reduction order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


register_backbone("resnet20x5", partial(PreActResNet, depth=20, width=5))
register_backbone("preact_resnet20", partial(PreActResNet, depth=20, width=1))
register_backbone("preact_resnet8", partial(PreActResNet, depth=8, width=1))
