"""The small CNNs of federated-learning papers: ``fed_cnn`` (2 conv + 3 FC, FedFree's global / HmFL model) and
``fedavg_cnn`` (2 conv + 2 FC, McMahan et al.'s FedAvg CNN as in PFLlib / HtFLlib ``FedAvgCNN``).

Layout (HtFLlib ``FedAvgCNN`` / ``CNN``): ``conv1`` = Conv 5x5 (3->32, no padding) + ReLU + 2x2 max-pool, ``conv2``
= Conv 5x5 (32->64) + ReLU + 2x2 max-pool, flatten (64*5*5 = 1600 for 32x32 inputs, 64*13*13 = 10816 for 64x64
Tiny-ImageNet: HtFLlib's ``dim``), ``fc1`` = the hidden Linear + ReLU layers ending at ``feature_dim`` = 512, ``fc`` =
the classifier.

FedFree (Du et al., NeurIPS 2025, Table A1) describes its global and HmFL model as "CNN with 2 conv + 3 FC, about
3.2M parameters". No layout of HtFLlib reaches 3.2M with 2 conv + 3 FC; ``fed_cnn`` adds one 512->512 hidden layer to
``FedAvgCNN`` (1600->512->512->C: 1.19M parameters for 100 classes). ``hidden=(1536,)`` (1600->1536->512->C, 3.35M)
matches the stated size if that matters more than the layer widths (our choice; documented in
docs/methods/federated.md).
Both are registered with the common 512-d feature + head interface in :mod:`.fed_clients`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FedCNN(nn.Module):
    """Two 5x5 conv blocks and a stack of fully connected layers.

    Args:
        num_classes: size of the classifier ``fc``.
        in_channels: input channels (3 for CIFAR).
        input_size: input height = width (32 for CIFAR); sets the flattened width.
        channels: output channels of the two conv blocks.
        hidden: widths of the hidden Linear layers between the flattened maps and ``feature_dim``; ``(512,)`` makes
            2 conv + 3 FC (``fed_cnn``), ``()`` makes 2 conv + 2 FC (``fedavg_cnn``).
        feature_dim: width of the features the classifier reads (512 in HtFLlib).
    """

    def __init__(self, num_classes: int = 100, in_channels: int = 3, input_size: int = 32,
                 channels: Sequence[int] = (32, 64), hidden: Sequence[int] = (512,), feature_dim: int = 512) -> None:
        super().__init__()
        if len(channels) != 2:
            raise ValueError(f"FedCNN has two conv blocks; channels must have 2 entries, got {list(channels)}")
        size = input_size
        for _ in range(2):
            size = (size - 4) // 2
        if size < 1:
            raise ValueError(f"input_size={input_size} is too small for two 5x5 conv + 2x2 pool blocks (needs >= 14)")
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, channels[0], 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(channels[0], channels[1], 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        widths = [channels[1] * size * size, *hidden, feature_dim]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.fc1 = nn.Sequential(*layers)
        self.num_features = feature_dim
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(torch.flatten(self.conv2(self.conv1(x)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

