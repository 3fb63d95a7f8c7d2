"""VGG for 32x32 inputs with the three-layer classifier: VGG-19 = 16 conv + 3 FC = 19 layers, the main backbone of
the Tunnel Effect study (Masarczyk et al., NeurIPS 2023, arXiv 2305.19753, Fig. 1: 19 probed layers).

Differs from the package's ``vgg19`` (``models/vgg.py``, the distillation-zoo layout with one linear layer after
global pooling, 17 layers) in its head: ``flatten(512) -> FC 512 -> ReLU -> FC 512 -> ReLU -> FC classes``, as in
the common CIFAR VGG (chengyangfu/pytorch-vgg-cifar10). Five 2x2 max-poolings take 32x32 maps to 1x1. Each conv is
``conv -> [BN] -> ReLU`` with its own ReLU module, so every layer's post-nonlinearity output can be hooked;
:meth:`VGGFC3.probe_points` lists them in forward order. BatchNorm is on by default (our choice: the paper does
not say; VGG-19 does not train at lr 0.1 without it) and ``batch_norm=False`` gives the plain VGG. ``width``
scales every layer's channels (the paper's width study); dropout before the hidden FC layers is off by default.

Registered: ``vgg11_3fc``, ``vgg13_3fc``, ``vgg16_3fc``, ``vgg19_3fc`` (keyword arguments: ``batch_norm``, ``width``,
``fc_width``, ``dropout``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lightning_methods.models.init import init_conv_bn_linear
from lightning_methods.models.registry import register_backbone

CONV_WIDTHS: dict[str, list[list[int]]] = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class ConvLayer(nn.Sequential):
    """``conv -> [bn] -> act``."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm)
        if batch_norm:
            self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)


class VGGFC3(nn.Module):
    """VGG with a three-layer classifier for 32x32 inputs.

    Args:
        cfg: conv widths of the five blocks (a max-pool follows each block).
        num_classes: size of the output layer.
        batch_norm: BatchNorm after every conv.
        width: multiplier of every conv width (1.0 = the standard network).
        fc_width: units of the two hidden FC layers (default: the last conv width).
        dropout: dropout before each hidden FC layer (0 disables).
    """

    def __init__(self, cfg: list[list[int]], num_classes: int = 10, batch_norm: bool = True, width: float = 1.0,
                 fc_width: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        blocks: list[nn.Module] = []
        in_ch = 3
        for widths in cfg:
            for w in widths:
                out_ch = max(1, int(round(w * width)))
                blocks.append(ConvLayer(in_ch, out_ch, batch_norm))
                in_ch = out_ch
            blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        fc = fc_width or in_ch
        self.fc1, self.act1 = nn.Linear(in_ch, fc), nn.ReLU(inplace=True)
        self.fc2, self.act2 = nn.Linear(fc, fc), nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(fc, num_classes)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num_features = fc
        init_conv_bn_linear(self, linear_std=None)  # He-normal convs, BN 1/0, default Linear weights, zero biases

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        if x.shape[1] != self.fc1.in_features:
            raise ValueError(f"VGGFC3 expects 32x32 inputs (five 2x2 poolings to 1x1); got {x.shape[1]} features "
                             f"after the convolutions instead of {self.fc1.in_features}")
        x = self.act1(self.fc1(self.drop(x)))
        return self.act2(self.fc2(self.drop(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.forward_features(x))

    def probe_points(self) -> list[tuple[str, str, str | None]]:
        """``(name, module, activation)`` of the 16 conv (``conv1`` ...) and 3 FC layers in forward order."""
        convs = [i for i, m in enumerate(self.features) if isinstance(m, ConvLayer)]
        points = [(f"conv{k + 1}", f"features.{i}.act", None) for k, i in enumerate(convs)]
        return points + [("fc1", "act1", None), ("fc2", "act2", None), ("fc3", "fc3", None)]


for _name, _cfg in CONV_WIDTHS.items():
    register_backbone(f"{_name}_3fc", partial(VGGFC3, _cfg))
