"""Weight initialisation shared by the CIFAR backbones of the distillation zoo (the CRD / mdistiller recipe)."""

from __future__ import annotations

import math

from torch import nn


def init_conv_bn_linear(module: nn.Module, linear_std: float | None = 0.01) -> None:
    """He-normal (fan-out) convolutions, BatchNorm scale 1 and shift 0, and ``Linear`` weights ``N(0, linear_std)``
    (kept at PyTorch's default when ``linear_std`` is ``None``) with zero bias, over every submodule in order."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
