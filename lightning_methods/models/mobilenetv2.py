"""MobileNetV2 (Sandler et al., arXiv 1801.04381) in the CIFAR layout of the distillation literature.

``MobileNetV2`` here is the half-width CIFAR student of CRD (arXiv 1910.10699) and mdistiller, also called
``mobile_half``: expansion ratio 6, width multiplier 0.5, a stride-2 3x3 stem, the seven inverted-residual stages of
the paper with strides 1, 1, 2, 2, 1, 2, 1 (the second stage keeps stride 1 for 32x32 inputs), a 1x1 conv to 1280
channels, global average pooling and one linear layer (0.81M parameters for 100 classes).

Parameter names (``conv1.{0,1}``, ``blocks.{i}.{j}.conv.{0,1,3,4,6,7}``, ``conv2.{0,1}``, ``classifier.0``) equal
mdistiller's so the shared CIFAR-100 checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lightning_methods.models.init import init_conv_bn_linear
from lightning_methods.models.registry import register_backbone

#: (expansion placeholder "T" or 1, output channels, blocks, first stride) of the seven stages (paper Table 2,
#: CIFAR strides).
STAGES: tuple[tuple[bool, int, int, int], ...] = (
    (False, 16, 1, 1),
    (True, 24, 2, 1),
    (True, 32, 3, 2),
    (True, 64, 4, 2),
    (True, 96, 3, 1),
    (True, 160, 3, 2),
    (True, 320, 1, 1),
)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise (stride) -> 1x1 linear projection, identity shortcut when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_shortcut = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2.

    Args:
        num_classes: size of the output layer.
        expansion: expansion ratio T of the inverted residual blocks (6 in the paper).
        width_mult: channel multiplier (0.5 for the distillation student ``mobile_half``).
    """

    def __init__(self, num_classes: int = 100, expansion: int = 6, width_mult: float = 0.5) -> None:
        super().__init__()
        in_ch = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_ch, 3, 2)
        stages = []
        for expand, channels, n, stride in STAGES:
            out_ch = int(channels * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expansion if expand else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(stages)
        # the 1280-channel head is only widened for width_mult > 1 (as in the paper's reference layout)
        self.num_features = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_ch, self.num_features, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.num_features, num_classes))
        init_conv_bn_linear(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return torch.flatten(self.avgpool(self.conv2(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


# CIFAR-100 distillation zoo student (mdistiller names)
register_backbone("MobileNetV2", partial(MobileNetV2, expansion=6, width_mult=0.5))
register_backbone("mobile_half", partial(MobileNetV2, expansion=6, width_mult=0.5))
