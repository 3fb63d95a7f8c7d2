"""ShuffleNet V2 (Ma et al., arXiv 1807.11164) in the CIFAR layout of the distillation literature.

``ShuffleV2`` is the CRD / mdistiller student (width 1x): a 1x1 stem to 24 channels (no stride, no pooling), three
stages with 116, 232, 464 channels made of one stride-2 down-sampling unit followed by 3, 7, 3 basic units, a 1x1
conv to 1024 channels, global average pooling and one linear layer (1.36M parameters for 100 classes).

Parameter names (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv,bn}{1..5}``, ``conv2``, ``bn2``, ``linear``) equal
mdistiller's so the shared CIFAR-100 checkpoints load with ``strict=True``. Layers keep PyTorch's default
initialization, as there.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.models.registry import register_backbone
from lightning_methods.models.shufflenetv1 import channel_shuffle

#: width multiplier -> (stage channels..., head channels), blocks per stage (paper Table 5).
WIDTHS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


def _dw(ch: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(ch, ch, 3, stride, 1, groups=ch, bias=False)


def _pw(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, bias=False)


class BasicUnit(nn.Module):
    """Channel split: one half passes through, the other goes 1x1 -> 3x3 depthwise -> 1x1; concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = _pw(half, half), nn.BatchNorm2d(half)
        self.conv2, self.bn2 = _dw(half, 1), nn.BatchNorm2d(half)
        self.conv3, self.bn3 = _pw(half, half), nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x.chunk(2, dim=1)
        work = F.relu(self.bn1(self.conv1(work)))
        work = self.bn2(self.conv2(work))
        work = F.relu(self.bn3(self.conv3(work)))
        return channel_shuffle(torch.cat([keep, work], 1), 2)


class DownUnit(nn.Module):
    """Stride-2 unit: both branches see the whole input (left: depthwise -> 1x1; right: 1x1 -> depthwise -> 1x1)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.conv1, self.bn1 = _dw(in_ch, 2), nn.BatchNorm2d(in_ch)
        self.conv2, self.bn2 = _pw(in_ch, mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _pw(in_ch, mid), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = _dw(mid, 2), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _pw(mid, mid), nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNet V2.

    Args:
        num_classes: size of the output layer.
        width: width multiplier, one of 0.5, 1.0, 1.5, 2.0 (``ShuffleV2`` = 1.0).
    """

    def __init__(self, num_classes: int = 100, width: float = 1.0) -> None:
        super().__init__()
        if width not in WIDTHS:
            raise ValueError(f"ShuffleNetV2 width must be one of {sorted(WIDTHS)}, got {width}")
        channels, num_blocks = WIDTHS[width]
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_ch = 24
        stages = []
        for out_ch, n in zip(channels[:3], num_blocks):
            stages.append(nn.Sequential(DownUnit(in_ch, out_ch), *[BasicUnit(out_ch) for _ in range(n)]))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _pw(in_ch, channels[3])
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.num_features = channels[3]
        self.linear = nn.Linear(channels[3], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


register_backbone("ShuffleV2", partial(ShuffleNetV2, width=1.0))
