"""Knowledge Gain Entropy (Eq. 6) and the projection of a global layer into a client layer (Eq. 7).

Du et al., "FedFree: Breaking Knowledge-sharing Barriers through Layer-wise Alignment in Heterogeneous Federated
Learning" (NeurIPS 2025; OpenReview G10Y4vrhGF). ``H(x)`` is the Shannon entropy (nats) of the 256-bin histogram of
the flattened weight tensor over its own [min, max] range, so it is invariant to ``x -> a x + b`` (a > 0) and
``log(bins)`` at most; a constant tensor has no spread and gets 0. ``KGE(theta, g) = H(g) - H(theta)``; each client
receives at most one global layer per round: the type-compatible pair with the largest positive KGE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_methods.federated.layers import LayerSpec


def histogram_entropy(x: torch.Tensor, bins: int = 256) -> float:
    """Shannon entropy in nats of the ``bins``-bin min-max histogram of ``x`` (flattened); 0 for constant tensors."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    x = x.detach().flatten().cpu()
    if not x.is_floating_point():
        x = x.double()
    if x.numel() == 0:
        raise ValueError("histogram_entropy of an empty tensor")
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return 0.0
    counts = torch.histc(x, bins=bins, min=lo, max=hi).double()  # binned in the tensor's own precision
    p = counts[counts > 0] / x.numel()
    return float(-(p * p.log()).sum())


def kge(global_weight: torch.Tensor, local_weight: torch.Tensor, bins: int = 256) -> float:
    """Eq. 6: ``H(global) - H(local)``; positive when the global layer carries more "knowledge" (spread)."""
    return histogram_entropy(global_weight, bins) - histogram_entropy(local_weight, bins)


@dataclass(frozen=True)
class AlignmentChoice:
    """The global layer one client receives: ``global_name`` is projected into its layer ``local_name``."""

    local_name: str
    global_name: str
    kge: float


def kge_select(local_entropies: Mapping[str, float], local_specs: Sequence[LayerSpec],
               global_entropies: Mapping[str, float], global_specs: Sequence[LayerSpec],
               candidates: Mapping[str, Sequence[str]] | None = None) -> AlignmentChoice | None:
    """The (local, global) pair of the same kind with the largest positive KGE, or ``None``.

    Args:
        local_entropies: ``H`` of the client's uploaded (critical) layers, by layer name.
        local_specs: the specs of those layers (candidates, in order; ties go to the first local layer, then the
            first global layer).
        global_entropies: ``H`` of every global layer, by name.
        global_specs: the global model's layers.
        candidates: per local layer name, the global layer names it may receive (``None``: every global layer of
            the same kind, the paper's rule; FedFree's ``kge_candidates="mapped"`` passes the depth-mapped one).
    """
    best: AlignmentChoice | None = None
    for spec in local_specs:
        for g in global_specs:
            if g.kind != spec.kind or (candidates is not None and g.name not in candidates[spec.name]):
                continue
            value = global_entropies[g.name] - local_entropies[spec.name]
            if value > 0 and (best is None or value > best.kge):
                best = AlignmentChoice(spec.name, g.name, value)
    return best


def project_layer(global_params: Mapping[str, torch.Tensor], local_params: Mapping[str, torch.Tensor],
                  fill: str = "keep") -> dict[str, torch.Tensor]:
    """Eq. 7: copy the first ``d_min = min(d_global, d_local)`` flattened entries of each global tensor into the
    local tensor of the same key (weight, bias); the local shape never changes.

    Args:
        global_params: ``{"weight": ..., "bias"?: ...}`` of the global layer.
        local_params: the same keys of the client layer (a local bias without a global one follows ``fill``
            entirely; a global bias without a local one is ignored).
        fill: the remaining local entries keep their values (``"keep"``, default, our choice) or become 0
            (``"zero"``); the paper states both.

    Returns:
        New tensors (the inputs are not modified), in the local dtype and device.
    """
    if fill not in ("keep", "zero"):
        raise ValueError(f"projection_fill must be 'keep' or 'zero', got {fill!r}")
    out = {}
    for key, local in local_params.items():
        flat = local.detach().clone().flatten()
        if fill == "zero":
            flat.zero_()
        if key in global_params:
            src = global_params[key].detach().flatten().to(flat)
            d = min(src.numel(), flat.numel())
            flat[:d] = src[:d]
        out[key] = flat.view_as(local)
    return out
