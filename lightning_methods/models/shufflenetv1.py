"""ShuffleNet V1 (Zhang et al., arXiv 1707.01083) in the CIFAR layout of the distillation literature.

``ShuffleV1`` is the CRD / mdistiller student: a 1x1 stem to 24 channels (no stride, no pooling), three stages of
4, 8, 4 bottlenecks with 240, 480, 960 output channels and 3 groups, global average pooling and one linear layer
(0.95M parameters for 100 classes). The first bottleneck of every stage has stride 2 and concatenates its output with
a 3x3 average-pooled shortcut; the others add an identity shortcut. The first 1x1 convolution of the network's first
block is ungrouped (24 input channels), as in the paper.

Parameter names (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv,bn}{1,2,3}``, ``linear``) equal mdistiller's so the
shared CIFAR-100 checkpoints load with ``strict=True``. Layers keep PyTorch's default initialization, as there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.models.registry import register_backbone


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups: (N, g*c, H, W) -> (N, c*g, H, W)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBottleneck(nn.Module):
    """Grouped 1x1 -> channel shuffle -> 3x3 depthwise (stride) -> grouped 1x1, then add or concatenate."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = out_ch // 4
        self.stride = stride
        self.first_groups = 1 if in_ch == 24 else groups
        self.conv1 = nn.Conv2d(in_ch, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    """CIFAR ShuffleNet V1.

    Args:
        num_classes: size of the output layer.
        out_channels: output channels of the three stages.
        num_blocks: bottlenecks per stage.
        groups: groups of the 1x1 convolutions.
    """

    def __init__(self, num_classes: int = 100, out_channels: tuple[int, int, int] = (240, 480, 960),
                 num_blocks: tuple[int, int, int] = (4, 8, 4), groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_ch = 24
        stages = []
        for out_ch, n in zip(out_channels, num_blocks):
            # the strided first block concatenates the pooled input, so its own branch outputs out_ch - in_ch
            blocks = [ShuffleBottleneck(in_ch, out_ch - in_ch, 2, groups)]
            blocks += [ShuffleBottleneck(out_ch, out_ch, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = in_ch
        self.linear = nn.Linear(in_ch, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


register_backbone("ShuffleV1", ShuffleNetV1)
