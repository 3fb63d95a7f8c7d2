"""Attention locality measures: Mean Attention Distance (MAD) and normalized attention entropy, per layer and head.

As defined in the vit_locality spec for "Inducing Spatial Locality in Vision Transformers through the Training
Protocol" (Santiago Toledo and Martinez, arXiv 2605.16390), making explicit the MAD of the ViT paper (Dosovitskiy et
al., arXiv 2010.11929) and of "Do Vision Transformers See Like Convolutional Neural Networks?" (arXiv 2108.08810).

For one head, image and layer take the softmax attention ``A`` of shape (T, T) over T = p + N tokens (p prefix tokens
such as CLS, then N patches in row-major order on a G_h x G_w grid). :func:`patch_attention` keeps the N patch query
rows; with ``include_cls=False`` (default) it drops the prefix keys and, with ``renormalize=True`` (default),
rescales each row to sum to 1 over the N patch keys. With ``include_cls=True`` the prefix keys stay in the rows
(they have no position: they add zero distance, and count as keys for the entropy).

- MAD (patch units) = (1/N) sum_i sum_j A_ij d_ij with d_ij the Euclidean distance between patches i and j in patch
  units; :func:`normalize_mad` divides it by D_norm: "grid" G, "diag" G*sqrt(2), "maxdist" (G-1)*sqrt(2) (square
  grids), or reports "patch" units or "pixel" units (times the patch size, the ViT paper's convention).
- normalized entropy = (1/N) sum_i [-sum_j A_ij log A_ij] / log K (K keys per row, 0 log 0 := 0), in [0, 1].

Per-image values are averaged over images by the caller, so the result does not depend on batch size or order.
Reference values (8x8 grid): uniform attention MAD 4.1365 patches = 0.5171 / 0.3656 / 0.4178 (grid / diag /
maxdist), entropy 1; identity attention MAD 0, entropy 0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from lightning_methods.analysis.attention_extract import AttentionRecorder, Method, eager, vit_geometry

MadNorm = Literal["grid", "diag", "maxdist", "patch", "pixel"]
#: The three normalisations the spec logs (the paper's choice is not known).
MAD_NORMS: tuple[str, ...] = ("grid", "diag", "maxdist")


def as_grid(grid_size: int | Sequence[int]) -> tuple[int, int]:
    """``8`` or ``(8, 8)`` -> ``(8, 8)``; positive integers only."""
    grid = (int(grid_size), int(grid_size)) if isinstance(grid_size, int) else tuple(int(g) for g in grid_size)
    if len(grid) != 2 or min(grid) <= 0:
        raise ValueError(f"grid_size must be a positive int or a pair of positive ints, got {grid_size!r}")
    return grid  # type: ignore[return-value]


def patch_distances(grid_size: int | Sequence[int], dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Euclidean distances (N, N) between the patches of a grid in patch units (row-major patch order)."""
    gh, gw = as_grid(grid_size)
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=dtype, device=device),
                                torch.arange(gw, dtype=dtype, device=device), indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)
    return torch.cdist(pos, pos)


def patch_attention(attn: torch.Tensor, num_prefix_tokens: int = 1, include_cls: bool = False,
                    renormalize: bool = True) -> torch.Tensor:
    """The patch-query rows of softmax attention maps.

    Args:
        attn: attention probabilities (..., T, T), rows summing to 1, tokens = ``num_prefix_tokens`` then patches.
        num_prefix_tokens: number of leading non-patch tokens (CLS, distillation, register tokens).
        include_cls: keep the prefix keys in every row (shape (..., N, T)); otherwise drop them ((..., N, N)).
        renormalize: after dropping the prefix keys, rescale each row to sum to 1 over the N patch keys (ignored when
            ``include_cls``: the rows already sum to 1).

    Raises:
        ValueError: if ``attn`` is not square in its last two dimensions or has no patch tokens.
    """
    if attn.ndim < 2 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention maps must have shape (..., T, T), got {tuple(attn.shape)}")
    p = int(num_prefix_tokens)
    if not 0 <= p < attn.shape[-1]:
        raise ValueError(f"num_prefix_tokens {p} leaves no patch tokens in attention over {attn.shape[-1]} tokens")
    rows = attn[..., p:, :]
    if include_cls:
        return rows
    rows = rows[..., p:]
    if renormalize:
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    return rows


def _check_rows(rows: torch.Tensor, grid: tuple[int, int]) -> int:
    n = grid[0] * grid[1]
    if rows.ndim < 2 or rows.shape[-2] != n or rows.shape[-1] < n:
        raise ValueError(f"patch attention rows of shape {tuple(rows.shape)} do not fit a {grid[0]}x{grid[1]} grid "
                         f"({n} patch queries, at least {n} keys): check grid_size and num_prefix_tokens")
    return rows.shape[-1] - n


def mean_attention_distance(rows: torch.Tensor, grid_size: int | Sequence[int]) -> torch.Tensor:
    """MAD in patch units of patch-query rows (..., N, K): ``mean_i sum_j A_ij d_ij``, shape ``(...)``.

    ``K - N`` leading prefix keys (``include_cls=True``) count as distance 0.
    """
    grid = as_grid(grid_size)
    extra = _check_rows(rows, grid)
    d = patch_distances(grid, dtype=rows.dtype, device=rows.device)
    if extra:
        d = torch.cat([d.new_zeros(d.shape[0], extra), d], dim=1)
    return (rows * d).sum(-1).mean(-1)


def normalized_entropy(rows: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of the attention entropy divided by ``log K`` (K keys), shape ``(...)``, in [0, 1]."""
    k = rows.shape[-1]
    if k < 2:
        raise ValueError(f"normalized entropy needs at least 2 keys per row, got {k}")
    return (-torch.special.xlogy(rows, rows).sum(-1) / math.log(k)).mean(-1)


def mad_scale(norm: str, grid_size: int | Sequence[int], patch_size: int | None = None) -> float:
    """The divisor D_norm that turns a MAD in patch units into the ``norm`` convention (see the module docstring).

    Raises:
        ValueError: unknown ``norm``; "grid" / "diag" / "maxdist" on a non-square grid; "maxdist" on a 1x1 grid;
            "pixel" without ``patch_size``.
    """
    gh, gw = as_grid(grid_size)
    if norm == "patch":
        return 1.0
    if norm == "pixel":
        if not patch_size:
            raise ValueError("MAD in pixel units needs the patch size")
        return 1.0 / patch_size
    if norm not in MAD_NORMS:
        raise ValueError(f"unknown MAD normalisation {norm!r}; choose one of {MAD_NORMS + ('patch', 'pixel')}")
    if gh != gw:
        raise ValueError(f"the {norm!r} normalisation is defined for square grids, got {gh}x{gw}; use 'patch'")
    if norm == "grid":
        return float(gh)
    if norm == "diag":
        return gh * math.sqrt(2.0)
    if gh < 2:
        raise ValueError("the 'maxdist' normalisation needs a grid of at least 2x2")
    return (gh - 1) * math.sqrt(2.0)


def normalize_mad(mad_patch: torch.Tensor | float, norm: str, grid_size: int | Sequence[int],
                  patch_size: int | None = None) -> torch.Tensor | float:
    """A MAD in patch units expressed in the ``norm`` convention (divided by :func:`mad_scale`)."""
    return mad_patch / mad_scale(norm, grid_size, patch_size)


def layer_list(layers: int | Sequence[int], num_layers: int) -> list[int]:
    """``2`` -> ``[2]``; negative layers count from the end; errors name the valid range."""
    out = [layers] if isinstance(layers, int) else list(layers)
    if not out:
        raise ValueError("no layers given")
    bad = [layer for layer in out if not -num_layers <= layer < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {num_layers} attention layers")
    return [layer % num_layers for layer in out]


def min_over_heads(values: torch.Tensor, layers: int | Sequence[int] = 0) -> float:
    """Minimum over the heads of the given layers of a (layers, heads) table (the paper's "minimum MAD")."""
    return float(values[layer_list(layers, values.shape[0])].min())


def early_layers(num_layers: int, max_layer: int = 2) -> list[int]:
    """Layers ``0 .. max_layer`` (``layers <= 2`` by default), clipped to the model depth."""
    return list(range(min(max_layer, num_layers - 1) + 1))


def locality_summary(mad_patch: torch.Tensor, entropy: torch.Tensor, grid_size: int | Sequence[int],
                     max_early_layer: int = 2, norms: Sequence[str] = MAD_NORMS) -> dict[str, float]:
    """Flat dict of per-head values and summaries from (layers, heads) tables of MAD (patch units) and entropy.

    Keys: ``mad_{norm}/L{l}H{h}``, ``entropy/L{l}H{h}``, ``min_mad_{norm}/layer0`` (minimum over the heads of layer
    0), ``min_mad_{norm}/early`` (over layers 0..max_early_layer), ``mean_mad_{norm}/early``, ``mean_entropy/early``,
    ``min_entropy/layer0``.
    """
    if mad_patch.shape != entropy.shape or mad_patch.ndim != 2:
        raise ValueError(f"expected two (layers, heads) tables, got {tuple(mad_patch.shape)} and "
                         f"{tuple(entropy.shape)}")
    early = early_layers(mad_patch.shape[0], max_early_layer)
    out: dict[str, float] = {}
    for norm in norms:
        mad = mad_patch.double() / mad_scale(norm, grid_size)
        out.update({f"mad_{norm}/L{l}H{h}": float(mad[l, h]) for l in range(mad.shape[0]) for h in range(mad.shape[1])})
        out[f"min_mad_{norm}/layer0"] = min_over_heads(mad, 0)
        out[f"min_mad_{norm}/early"] = min_over_heads(mad, early)
        out[f"mean_mad_{norm}/early"] = float(mad[early].mean())
    ent = entropy.double()
    out.update({f"entropy/L{l}H{h}": float(ent[l, h]) for l in range(ent.shape[0]) for h in range(ent.shape[1])})
    out["mean_entropy/early"] = float(ent[early].mean())
    out["min_entropy/layer0"] = min_over_heads(ent, 0)
    return out


# ---------------------------------------------------------------------------------------------- over a model
def probe_indices(n_total: int, num_images: int, seed: int = 0) -> torch.Tensor:
    """A seeded, sorted choice of ``num_images`` positions out of ``n_total`` (the fixed probe set).

    Raises:
        ValueError: if ``num_images`` exceeds ``n_total`` or is not positive.
    """
    if not 0 < num_images <= n_total:
        raise ValueError(f"the locality probe set ({num_images} images) must be a non-empty subset of the evaluation "
                         f"set, which has {n_total} images: lower num_images to at most {n_total}")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:num_images].sort().values


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own ``training`` flag afterwards (so modules a user
    keeps in eval on purpose, e.g. frozen BatchNorm, stay as they were)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@torch.no_grad()
def attention_locality(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 100,
    include_cls: bool = False,
    renormalize: bool = True,
    method: Method = "auto",
    grid_size: int | Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    patch_size: int | Sequence[int] | None = None,
    keep_maps: int = 0,
) -> dict:
    """Per-image MAD (patch units) and normalized entropy of every layer and head of a timm ViT.

    Runs in eval mode, without gradients and without autocast (in the parameters' dtype, fp32 for mixed-precision
    training), and restores the modules' modes; the attention is read by :class:`AttentionRecorder` without changing
    the model; the measures are computed in float64.

    Args:
        model: the ViT (a module with timm attention layers; its forward takes ``images``).
        images: normalized float images (n, C, H, W) on any device (moved to the model's device per batch).
        batch_size: images per forward pass (results do not depend on it).
        include_cls: keep the prefix keys in the rows (see :func:`patch_attention`).
        renormalize: renormalize rows over the patch keys after dropping the prefix keys.
        method: attention extraction method (``"auto"``, ``"recompute"``, ``"explicit"``).
        grid_size, num_prefix_tokens, patch_size: the token geometry, read from timm models when ``None``.
        keep_maps: also return the patch-query attention rows of the first ``keep_maps`` images.

    Returns:
        ``{"mad": (n, layers, heads) float64, "entropy": (n, layers, heads) float64, "grid": (gh, gw),
        "patch_size": (ph, pw), "num_prefix_tokens": p, "maps": (keep_maps, layers, heads, N, K) float32 or None}``.

    Raises:
        ValueError: no attention layers, image size not divisible by the patch size, token counts that do not match
            the grid, empty ``images``.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (n, C, H, W) tensor, got shape {tuple(images.shape)}")
    recorder = AttentionRecorder(model, method)  # raises first for models without attention layers
    grid, prefix, patch = vit_geometry(model, images.shape[-2:], grid_size, num_prefix_tokens, patch_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32  # bf16-true models
    forward = eager(model)
    mads, ents, maps = [], [], []
    n_kept = 0
    with eval_mode(model), recorder as rec, torch.autocast(device.type, enabled=False):
        for start in range(0, len(images), batch_size):
            rec.clear()
            forward(images[start : start + batch_size].to(device, dtype))
            stats, kept = [], []
            for name, attn in zip(rec.names, rec.maps):
                if attn is None:
                    raise RuntimeError(f"attention layer {name} did not run in the forward pass")
                if attn.shape[-1] != grid[0] * grid[1] + prefix:
                    raise ValueError(f"layer {name} attends over {attn.shape[-1]} tokens, but a {grid[0]}x{grid[1]} "
                                     f"grid with {prefix} prefix tokens has {grid[0] * grid[1] + prefix}: pass "
                                     "grid_size / num_prefix_tokens")
                rows = patch_attention(attn.double(), prefix, include_cls, renormalize)  # (b, heads, N, K)
                stats.append((mean_attention_distance(rows, grid), normalized_entropy(rows)))
                kept.append(rows[: max(keep_maps - n_kept, 0)].float().cpu())
            mads.append(torch.stack([m for m, _ in stats], dim=1).cpu())  # (b, layers, heads)
            ents.append(torch.stack([e for _, e in stats], dim=1).cpu())
            if len(kept[0]):
                maps.append(torch.stack(kept, dim=1))
                n_kept += len(kept[0])
    return {"mad": torch.cat(mads), "entropy": torch.cat(ents), "grid": grid, "patch_size": patch,
            "num_prefix_tokens": prefix, "maps": torch.cat(maps) if maps else None}
