"""Multilayer perceptrons of configurable depth and width on flattened images, the MLP backbones of the Tunnel
Effect study (Masarczyk et al., NeurIPS 2023, arXiv 2305.19753: "a deeper MLP lengthens only the tunnel").

``depth`` counts the linear layers (``depth - 1`` hidden layers of ``width`` units, each followed by a ReLU, then the
output layer). The hidden layers are ``layers.{i}.linear`` / ``layers.{i}.act`` (optional ``layers.{i}.norm``), the
output layer is ``head``; :meth:`MLP.probe_points` lists one probe point per linear layer (after its ReLU; the logits
for the head). Registered names: ``mlp`` (all keyword arguments free) and the presets ``mlp4`` ... ``mlp16``
(width 1024, as in the reimplementation DHLSmith/jons-tunnel-effect, which trains MLP-6/8/10/12).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import nn

from lightning_methods.models.registry import register_backbone


class MLPLayer(nn.Sequential):
    """``linear -> [norm] -> act [-> dropout]``."""

    def __init__(self, in_features: int, out_features: int, batch_norm: bool, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        if batch_norm:
            self.norm = nn.BatchNorm1d(out_features)
        self.act = nn.ReLU()
        if dropout > 0:
            self.drop = nn.Dropout(dropout)


class MLP(nn.Module):
    """MLP classifier on flattened ``in_channels x input_size x input_size`` images.

    Args:
        num_classes: size of the output layer.
        depth: number of linear layers including the output layer (>= 2).
        width: units of every hidden layer.
        input_size: image height and width.
        in_channels: image channels.
        batch_norm: BatchNorm1d after every hidden linear layer (off in the paper's MLPs).
        dropout: dropout after every hidden activation (0 disables).
        init: ``"kaiming"`` (He normal, fan-in, for the hidden layers: keeps the signal of deep ReLU MLPs from
            vanishing; our choice) or ``"torch"`` (PyTorch's default ``nn.Linear`` initialisation, as in the
            reimplementation DHLSmith/jons-tunnel-effect).
    """

    def __init__(self, num_classes: int = 10, depth: int = 12, width: int = 1024, input_size: int = 32,
                 in_channels: int = 3, batch_norm: bool = False, dropout: float = 0.0,
                 init: Literal["kaiming", "torch"] = "kaiming") -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"an MLP needs depth >= 2 (one hidden layer and the output layer), got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features = in_channels * input_size * input_size
        dims = [self.in_features] + [width] * (depth - 1)
        self.layers = nn.Sequential(*[MLPLayer(a, b, batch_norm, dropout) for a, b in zip(dims[:-1], dims[1:])])
        self.head = nn.Linear(width, num_classes)
        self.num_features = width
        self.depth = depth
        if init not in ("kaiming", "torch"):
            raise ValueError(f"init must be 'kaiming' or 'torch', got {init!r}")
        if init == "kaiming":
            for layer in self.layers:
                nn.init.kaiming_normal_(layer.linear.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(layer.linear.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects inputs with {self.in_features} values per sample (input_size and "
                             f"in_channels), got {x.shape[1]}")
        return self.layers(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def probe_points(self) -> list[tuple[str, str, str | None]]:
        """``(name, module, activation)`` of every linear layer in forward order: ``fc1 ... fc{depth}``."""
        points = [(f"fc{i + 1}", f"layers.{i}.act", None) for i in range(len(self.layers))]
        return points + [(f"fc{self.depth}", "head", None)]


register_backbone("mlp", MLP)
for _depth in (4, 6, 8, 10, 12, 16):
    register_backbone(f"mlp{_depth}", partial(MLP, depth=_depth, width=1024))
