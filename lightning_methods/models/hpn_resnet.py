"""The CIFAR ResNet of the official Hyperspherical Prototype Networks code (psmmettes/hpn, models/cifar/resnet.py).

Mettes, van der Pol, Snoek. *Hyperspherical Prototype Networks*. NeurIPS 2019, arXiv 1901.10514.

A 6n + 2 ResNet (He et al., arXiv 1512.03385) with widths 16/32/64 times ``multiplier``, whose projection shortcut is
a **3x3** stride-2 convolution + BN (``shortcut="conv3x3"``, official) instead of the usual 1x1 (``"conv1x1"``,
option B as in :mod:`.cifar_resnet`). Global average pooling (the official ``AvgPool2d(8)`` on 32x32 inputs) and one
linear layer to ``num_classes`` outputs, which for HPN is the prototype dimension D. Convolutions are initialised
N(0, 2 / (k^2 out_channels)), BN with ones/zeros, the linear layer with the PyTorch default; modules are created and
initialised in the official order, so ``torch.manual_seed(s)`` gives the official weights, and parameter names
equal the official ones (its checkpoints load with ``strict=True``).

Registered names: ``hpn_resnet{8,14,20,32,44,56,110}`` (official shortcut; ``hpn_resnet32`` is the paper's CIFAR-100
network). Backbone options: ``shortcut``, ``multiplier``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

from torch import nn

from lightning_methods.models.cifar_resnet import BasicBlock, ThreeStageResNet
from lightning_methods.models.registry import register_backbone

Shortcut = Literal["conv3x3", "conv1x1"]


class HPNResNet(ThreeStageResNet):
    """The official HPN CIFAR ResNet.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110).
        num_classes: outputs of the last linear layer (the prototype dimension D for HPN, the class count for a
            softmax baseline).
        multiplier: width multiplier of the 16/32/64 stages (official: 1).
        shortcut: ``"conv3x3"`` (official: 3x3 stride-2 conv + BN) or ``"conv1x1"`` (1x1 conv + BN, option B).

    Raises:
        ValueError: a depth that is not 6n + 2, a multiplier < 1, or an unknown shortcut.
    """

    def __init__(self, depth: int = 32, num_classes: int = 100, multiplier: int = 1,
                 shortcut: Shortcut = "conv3x3") -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"HPN ResNet depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth}")
        if multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {multiplier}")
        if shortcut not in ("conv3x3", "conv1x1"):
            raise ValueError(f"shortcut must be 'conv3x3' (official HPN) or 'conv1x1', got {shortcut!r}")
        n = (depth - 2) // 6
        self.shortcut = shortcut
        self.inplanes = 16 * multiplier
        self.conv1 = nn.Conv2d(3, 16 * multiplier, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16 * multiplier)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16 * multiplier, n, 1)
        self.layer2 = self._make_layer(32 * multiplier, n, 2)
        self.layer3 = self._make_layer(64 * multiplier, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * multiplier, num_classes)
        self.num_features = 64 * multiplier
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:  # created before the block, as in the official code (RNG order)
            kernel = 3 if self.shortcut == "conv3x3" else 1
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel, stride, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_backbone(f"hpn_resnet{_depth}", partial(HPNResNet, _depth))
