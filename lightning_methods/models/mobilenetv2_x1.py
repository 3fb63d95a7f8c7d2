"""Full-width MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", arXiv
1801.04381) for 32x32 inputs: ``mobilenetv2_x1``.

The layout is torchvision's ``mobilenet_v2`` (width multiplier 1.0, channels rounded to multiples of 8, ReLU6,
expansion 6, a 1x1 conv to 1280 channels, dropout 0.2 before the classifier): the model of HtFLlib's ``HtFE-img-8``
client family, which FedFree uses. With ``stem="cifar"`` (default) the first conv and the second stage use stride 1
instead of 2 (as kuangliu/pytorch-cifar does for CIFAR), so the final map is 4x4 instead of 1x1;
``stem="imagenet"`` keeps torchvision's strides. 2.22M parameters without the classifier either way.

Not the half-width distillation student ``mobilenetv2`` / ``mobile_half`` of :mod:`.mobilenetv2` (0.81M).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import nn

from lightning_methods.models.registry import register_backbone

#: (expansion t, channels c, blocks n, ImageNet stride s) of the seven stages (paper Table 2).
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` without going more than 10% below it (TF slim rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=True))


class InvertedResidualX1(nn.Module):
    """1x1 expansion (none for t = 1) -> 3x3 depthwise -> 1x1 linear projection; identity shortcut if shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expansion))
        self.use_shortcut = stride == 1 and in_ch == out_ch
        layers = [conv_bn_relu6(in_ch, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_shortcut else self.conv(x)


class MobileNetV2X1(nn.Module):
    """MobileNetV2 at width 1.0; ``forward_features`` returns the 1280-d pooled features.

    Args:
        num_classes: size of the output layer.
        width_mult: channel multiplier (1.0 in the paper and in HtFLlib).
        stem: ``"cifar"`` (stride 1 in the first conv and the second stage) or ``"imagenet"`` (torchvision's strides).
        dropout: dropout before the classifier (0.2 in torchvision).
    """

    def __init__(self, num_classes: int = 100, width_mult: float = 1.0,
                 stem: Literal["cifar", "imagenet"] = "cifar", dropout: float = 0.2) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        cifar = stem == "cifar"
        in_ch = make_divisible(32 * width_mult)
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn_relu6(3, in_ch, 3, 1 if cifar else 2)]
        for i, (t, c, n, s) in enumerate(STAGES):
            out_ch = make_divisible(c * width_mult)
            stride = 1 if cifar and i == 1 else s
            for j in range(n):
                features.append(InvertedResidualX1(in_ch, out_ch, stride if j == 0 else 1, t))
                in_ch = out_ch
        features.append(conv_bn_relu6(in_ch, self.num_features, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


register_backbone("mobilenetv2_x1", partial(MobileNetV2X1, width_mult=1.0, stem="cifar"))
