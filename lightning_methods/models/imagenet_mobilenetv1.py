"""MobileNetV1 (Howard et al., *MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications*,
arXiv 1704.04861) as mdistiller defines it for ImageNet distillation (ResNet-50 -> MobileNet-V1 in DKD, arXiv
2203.08679; mdistiller ``mdistiller/models/imagenet/mobilenetv1.py``).

Layout of that definition (width 1.0, no width multiplier): a 3x3 stride-2 convolution to 32 channels, then 13
depthwise-separable blocks (3x3 depthwise conv + BN + ReLU, 1x1 pointwise conv + BN + ReLU) with the channel plan
64, 128(s2), 128, 256(s2), 256, 512(s2), 512 x5, 1024(s2), 1024, global average pooling and ``fc`` (1024 ->
classes). Convolutions have no bias. Parameter names (``model.<i>.<j>``, ``fc``) are mdistiller's, so its ImageNet
student checkpoints load with ``strict=True``. Differences: the pooling is adaptive (mdistiller: ``AvgPool2d(7)``,
which only fits 224 px inputs; identical at 224 px), and ``forward`` returns logits only (mdistiller also returns
the intermediate feature maps its feature-distillation methods use).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_methods.models.registry import register_backbone

#: (output channels, stride) of the 13 depthwise-separable blocks
BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _stem(out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, out_ch, 3, 2, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


def _separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False),
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 for ImageNet-size inputs; ``forward`` returns logits, ``forward_features`` the pooled 1024-d
    features.

    Args:
        num_classes: size of the classification layer ``fc`` (1000 for ImageNet-1k).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers, in_ch = [_stem(32)], 32
        for out_ch, stride in BLOCKS:
            layers.append(_separable(in_ch, out_ch, stride))
            in_ch = out_ch
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.num_features = in_ch
        self.fc = nn.Linear(in_ch, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.model(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


# the ImageNet distillation student of mdistiller / DKD (ResNet-50 -> MobileNet-V1)
register_backbone("imagenet_mobilenetv1", MobileNetV1)
