"""torchvision's ImageNet ResNet-18 / 34 / 50 (He et al., *Deep Residual Learning for Image Recognition*, arXiv
1512.03385) in the backbone registry, under names distinct from the CIFAR ResNets of ``models/resnet.py``.

They are torchvision's own ``ResNet`` (7x7 stride-2 stem with max-pool, ``BasicBlock`` / ``Bottleneck`` from
``torchvision.models.resnet``, weights=None: no download), so parameter names and counts equal
``torchvision.models.resnet18/34/50`` and torchvision's ImageNet weights (``ResNet34_Weights.IMAGENET1K_V1``, the
distillation teachers) load with ``strict=True``. Only ``forward_features`` (pooled features) and ``num_features``
are added, as every package backbone has them.
"""

from __future__ import annotations

from functools import partial

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as TorchvisionResNet

from lightning_methods.models.registry import register_backbone

#: blocks per stage of torchvision's ImageNet ResNets
DEPTHS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3])}


class ImageNetResNet(TorchvisionResNet):
    """torchvision's ImageNet ResNet with ``forward_features`` (pooled 512-d / 2048-d features).

    Args:
        depth: 18, 34 or 50.
        num_classes: size of the classification layer ``fc`` (1000 for ImageNet-1k).
        zero_init_residual: zero-initialize the last BatchNorm of every block (torchvision option, off by default as
            in torchvision and mdistiller).
    """

    def __init__(self, depth: int = 18, num_classes: int = 1000, zero_init_residual: bool = False) -> None:
        if depth not in DEPTHS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        block, layers = DEPTHS[depth]
        super().__init__(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)
        self.depth = depth
        self.num_features = self.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


# ImageNet-scale backbones (torchvision layout); the CIFAR ResNets keep the names resnet18 / resnet34 / resnet50
register_backbone("imagenet_resnet18", partial(ImageNetResNet, 18))
register_backbone("imagenet_resnet34", partial(ImageNetResNet, 34))
register_backbone("imagenet_resnet50", partial(ImageNetResNet, 50))
