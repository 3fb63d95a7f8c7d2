"""The RDM score network: a residual MLP with a timestep embedding ("SimpleMLP" of RCG, used by "Revisiting
Likelihood-Based OOD Detection by Modeling Representations", arXiv 2504.07793; official code
limchaos/Likelihood-OOD ``project/models/ScoreNet.py``).

``input_proj: Linear(d -> width)``; ``num_blocks`` residual blocks ``x + out(LN, SiLU, zero-init Linear)(in(LN, SiLU,
Linear)(x) + emb(SiLU, Linear)(t_emb) [+ ctx(SiLU, Linear)(c_emb)])``; output ``LN(eps 1e-6), SiLU, zero-init
Linear(width -> d)``. The time embedding is sinusoidal (``width`` channels, max period 10^4) followed by
``Linear(width -> time_embed_dim), SiLU, Linear``. The optional class context (conditional variant) embeds a float
label (``1 + predicted class``) with fixed Gaussian Fourier features (scale 30) and an MLP. Module names equal the
official ones, so an official state dict loads with :meth:`ScoreMLP.load_official_state_dict`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` with ``f_i = max_period^(-i / (dim // 2))`` (zero-padded)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GaussianFourierProjection(nn.Module):
    """Fixed random Fourier features ``[cos(2 pi x W), sin(2 pi x W)]`` with ``W ~ N(0, scale^2)`` (not trained)."""

    def __init__(self, dim: int, scale: float = 30.0) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(dim // 2) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = x * self.W * 2 * math.pi
        return torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1)


class ResBlock(nn.Module):
    """One residual block of :class:`ScoreMLP` (zero-initialised output layer, so it starts as the identity)."""

    def __init__(self, width: int, bottleneck: int, emb_dim: int, dropout: float = 0.0,
                 context_dim: int | None = None) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, bottleneck))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, bottleneck))
        self.out_layers = nn.Sequential(nn.LayerNorm(bottleneck), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Linear(bottleneck, width))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.context_layers = (nn.Sequential(nn.SiLU(), nn.Linear(context_dim, bottleneck))
                               if context_dim else None)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)
        if self.context_layers is not None and context is not None:
            h = h + self.context_layers(context)
        return x + self.out_layers(h)


class ScoreMLP(nn.Module):
    """Time-conditioned residual MLP on feature vectors (the RDM score network).

    Args:
        dim: feature dimension ``d`` (input and output).
        width: hidden width (``model_channels``; 1536 in the RDM code).
        bottleneck: width inside each block (1536).
        num_blocks: residual blocks (12).
        time_embed_dim: timestep embedding size (256).
        dropout: dropout inside the blocks (0).
        context_dim: size of the class-context embedding for the conditional variant (256 in the RDM code);
            ``None`` builds the unconditional network without context layers.
    """

    def __init__(self, dim: int, width: int = 1536, bottleneck: int = 1536, num_blocks: int = 12,
                 time_embed_dim: int = 256, dropout: float = 0.0, context_dim: int | None = None) -> None:
        super().__init__()
        if min(dim, width, bottleneck, time_embed_dim) < 1 or num_blocks < 0:
            raise ValueError(f"bad ScoreMLP sizes: dim={dim}, width={width}, bottleneck={bottleneck}, "
                             f"num_blocks={num_blocks}, time_embed_dim={time_embed_dim}")
        self.dim, self.width = dim, width
        self.time_embed = nn.Sequential(nn.Linear(width, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        self.context_dim = context_dim
        if context_dim:
            self.context_gf = GaussianFourierProjection(context_dim)
            self.context_embed = nn.Sequential(nn.Linear(context_dim, context_dim), nn.SiLU(),
                                               nn.Linear(context_dim, context_dim))
        self.input_proj = nn.Linear(dim, width)
        self.res_blocks = nn.ModuleList(
            ResBlock(width, bottleneck, time_embed_dim, dropout, context_dim) for _ in range(num_blocks))
        self.out = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Network output for features ``x`` (B, d) at time inputs ``t`` (B,) (the SDE's ``time_input``) and, for
        the conditional variant, float class labels ``context`` (B,) or (B, 1)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ScoreMLP expects features of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.width).to(x.dtype))
        ctx = None
        if self.context_dim:
            if context is None:
                raise ValueError("this ScoreMLP is conditional (context_dim set): pass the class context")
            ctx = self.context_embed(self.context_gf(context.reshape(-1, 1).to(x.dtype)))
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, emb, ctx)
        return self.out(h)

    def load_official_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict of the official ``SimpleMLP`` (context entries are dropped for an unconditional net).

        Raises:
            RuntimeError: missing, unexpected or mis-shaped keys (listed).
        """
        context_keys = ("context_gf.", "context_embed.", ".context_layers.")
        if not self.context_dim:
            state = {k: v for k, v in state.items() if not any(c in k or k.startswith(c) for c in context_keys)}
        self.load_state_dict(state, strict=True)

    def num_parameters(self) -> int:
        """Number of trainable parameters (the fixed Fourier features excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
