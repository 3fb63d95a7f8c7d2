"""VGG with batch normalization for 32x32 inputs (Simonyan and Zisserman, arXiv 1409.1556; CIFAR layout of CRD).

Five conv blocks separated by 2x2 max-pooling (four poolings for 32x32 inputs), the last block followed by global
average pooling and a single ``Linear(512, num_classes)``. Every block ends with BN (its last ReLU is applied in
``forward``), as in the shared CIFAR-100 teacher checkpoints (``block{0..4}.{i}``, ``classifier``).
VGG-8 is the CRD student configuration "S" (one conv per block).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.models.init import init_conv_bn_linear
from lightning_methods.models.registry import register_backbone

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(widths: list[int], in_ch: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_ch = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for CIFAR.

    Args:
        cfg: widths of the convolutions of each of the five blocks.
        num_classes: size of the output layer.
    """

    def __init__(self, cfg: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        in_ch = [3] + [c[-1] for c in cfg[:-1]]
        self.block0 = _block(cfg[0], in_ch[0])
        self.block1 = _block(cfg[1], in_ch[1])
        self.block2 = _block(cfg[2], in_ch[2])
        self.block3 = _block(cfg[3], in_ch[3])
        self.block4 = _block(cfg[4], in_ch[4])
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        self.num_features = cfg[4][-1]
        init_conv_bn_linear(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if x.shape[-1] >= 8:  # 64x64 inputs get a fourth pooling, as in the reference layout
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


for _name, _cfg in CONFIGS.items():
    register_backbone(_name, partial(VGG, _cfg))
