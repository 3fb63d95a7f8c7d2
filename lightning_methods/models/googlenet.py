"""GoogLeNet (Szegedy et al., "Going Deeper with Convolutions", arXiv 1409.4842) for 32x32 inputs.

The nine inception blocks (3a-5b) and their widths are those of the paper and of torchvision's ``googlenet``,
including torchvision's 3x3 kernel in the "5x5" branch (torchvision issue #906; kept because HtFLlib's ``HtFE-img-8``
client family, which FedFree uses, builds GoogLeNet from torchvision). Each convolution is followed by BatchNorm
(eps 1e-3) and ReLU; there are no auxiliary classifiers.

The stem is the CIFAR stem of kuangliu/pytorch-cifar: one 3x3 convolution 3->192 (stride 1, no max-pool), so the
inception blocks see 32x32 (3a, 3b), 16x16 (4a-4e) and 8x8 (5a, 5b) maps instead of ImageNet's 28/14/7 after a
stride-8 stem. ``stem="imagenet"`` builds torchvision's stem (7x7/2 conv, max-pools, 1x1 and 3x3 convs) instead.
5.48M parameters without the classifier (torchvision's ImageNet stem: 5.60M).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import nn

from lightning_methods.models.registry import register_backbone

#: (in, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool proj) of blocks 3a, 3b, 4a-4e, 5a, 5b (paper Table 1).
INCEPTION: dict[str, tuple[int, ...]] = {
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm (eps 1e-3, as torchvision's BasicConv2d) -> ReLU."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(out_ch, eps=1e-3), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1->3x3; 1x1->3x3; 3x3 max-pool->1x1) concatenated along channels."""

    def __init__(self, in_ch: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool_proj: int) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(in_ch, c1, 1)
        self.branch2 = nn.Sequential(conv_bn_relu(in_ch, c3r, 1), conv_bn_relu(c3r, c3, 3, padding=1))
        self.branch3 = nn.Sequential(conv_bn_relu(in_ch, c5r, 1), conv_bn_relu(c5r, c5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     conv_bn_relu(in_ch, pool_proj, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    """GoogLeNet with a CIFAR (or ImageNet) stem; ``forward_features`` returns the 1024-d pooled features.

    Args:
        num_classes: size of the output layer.
        stem: ``"cifar"`` (3x3 conv 3->192, stride 1) or ``"imagenet"`` (torchvision's stride-8 stem).
        dropout: dropout before the classifier (0.2 in torchvision).
    """

    def __init__(self, num_classes: int = 100, stem: Literal["cifar", "imagenet"] = "cifar",
                 dropout: float = 0.2) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = conv_bn_relu(3, 192, 3, padding=1)
        elif stem == "imagenet":
            self.stem = nn.Sequential(conv_bn_relu(3, 64, 7, 2, 3), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      conv_bn_relu(64, 64, 1), conv_bn_relu(64, 192, 3, padding=1),
                                      nn.MaxPool2d(3, 2, ceil_mode=True))
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        blocks = {name: Inception(*cfg) for name, cfg in INCEPTION.items()}
        self.stage3 = nn.Sequential(blocks["3a"], blocks["3b"])
        self.pool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.stage4 = nn.Sequential(*(blocks[k] for k in ("4a", "4b", "4c", "4d", "4e")))
        self.pool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.stage5 = nn.Sequential(blocks["5a"], blocks["5b"])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.num_features = 1024
        self.fc = nn.Linear(1024, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)  # torchvision's init
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool3(self.stage3(self.stem(x)))
        x = self.stage5(self.pool4(self.stage4(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


register_backbone("googlenet", partial(GoogLeNet, stem="cifar"))
