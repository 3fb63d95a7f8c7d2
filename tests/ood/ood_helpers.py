"""Shared pieces of the OOD tests: deterministic weights for comparisons with the official RDM code, tiny feature
sets and tiny RDM settings."""

from __future__ import annotations

import zlib

import torch

from lightning_methods.ood.features import EmbeddingSet
from lightning_methods.ood.score_net import ScoreMLP

# torch.manual_seed(0); torch.randint_like(x, 0, 2) * 2 - 1 for x of shape (3, 6): the probe the official
# get_likelihood_fn drew for the golden values
OFFICIAL_PROBE = torch.tensor([[-1.0, 1.0, 1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, -1.0],
                               [-1.0, 1.0, -1.0, -1.0, -1.0, -1.0]])

TINY_RDM = dict(width=32, bottleneck=32, num_blocks=2, time_embed_dim=16)


def fill_by_name(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deterministic values for every entry of a state dict, a function of the entry's name only (so the official
    SimpleMLP and ScoreMLP, which share names, get identical weights)."""
    out = {}
    for key in sorted(state):
        phase = (zlib.crc32(key.encode()) % 1000) / 100.0
        values = torch.sin(torch.arange(state[key].numel(), dtype=torch.float64) * 0.37 + phase) * 0.3
        out[key] = values.reshape(state[key].shape).to(state[key].dtype)
    return out


def official_net(conditional: bool = False) -> ScoreMLP:
    """ScoreMLP(6 -> 16, bottleneck 12, 2 blocks, time embedding 8[, context 8]) with the golden-value weights."""
    net = ScoreMLP(6, width=16, bottleneck=12, num_blocks=2, time_embed_dim=8, dropout=0.0,
                   context_dim=8 if conditional else None)
    net.load_state_dict(fill_by_name(net.state_dict()))
    return net.eval()


def gaussian_features(n: int, dim: int, seed: int = 0, shift: float = 0.0, classes: int = 1) -> EmbeddingSet:
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % classes
    x = torch.randn(n, dim, generator=g) + shift + targets[:, None].float()
    return EmbeddingSet(x, torch.arange(n), targets)
