"""Reverse layer-wise knowledge transfer (Eqs. 3-5): each global layer is trained so that its outputs on Gaussian
pseudo-data X ~ N(0, I) match the outputs of the client layers mapped onto it; no proxy data set is used.

Du et al., "FedFree: Breaking Knowledge-sharing Barriers through Layer-wise Alignment in Heterogeneous Federated
Learning" (NeurIPS 2025; OpenReview G10Y4vrhGF). The paper gives the objective in prose; the exact forms here are
our choice (documented in docs/methods/federated.md):

- ``L_D(g) = mean over mapped client layers theta of ||theta(X) - g(X)||^2``, the squared L2 norm over output units
  / channels averaged over pseudo-samples and spatial positions (``reduction="sum_units"``), minimised by ``steps``
  plain gradient steps with learning rate ``alpha`` on the global weight and bias (Eqs. 4-5). With X ~ N(0, I) the
  gradient is ``2 (W_g - mean W_theta) E[x x^T] = 2 (W_g - mean W_theta)``, so every step moves a global layer a
  fraction ``2 alpha`` of the way to the mean of its client layers, whatever the layer's size.
  ``reduction="mean"`` (an elementwise MSE) divides that rate by the number of compared outputs (512x slower for a
  512-unit layer);
- X has the global layer's input shape (``batch_size`` x in_features, or x C x H x W with the layer's native input
  size, or ``spatial`` x ``spatial``); a fresh X is drawn for every step from a seeded generator;
- client layers that meet the global layer in the same way (same kind, geometry and compared input / output widths)
  are merged by averaging their compared weights and biases before the steps: their outputs are linear in the
  weights, so the mean of their outputs - and hence the gradient - is exactly that of the merged layer. The loss
  reported per step is then the distance to the group means (the spread within a group, a constant in the global
  weights, is left out). With 100 clients and 8 families this turns ~200 client layers into a few dozen;
- shape mismatches: X is cropped or zero-padded to the client layer's input width (for ungrouped layers this equals
  cropping the client weight's input dimension), only the first ``min(out)`` channels / units are compared, and conv
  outputs of different spatial size are compared on their centred common window (exact alignment for stride-1
  layers whose sizes differ by an even number, e.g. 5x5 unpadded vs 3x3 padded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from lightning_methods.callbacks.nonfinite_guard import NonFiniteTrainingError
from lightning_methods.federated.layers import LayerSpec

Params = Mapping[str, torch.Tensor]


def pseudo_input(spec: LayerSpec, batch_size: int, generator: torch.Generator, spatial: int | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian pseudo-data shaped for ``spec``'s input (see the module docstring)."""
    if spec.kind == "linear":
        return torch.randn(batch_size, spec.in_features, generator=generator, dtype=dtype)
    if spatial is not None:
        size = (spatial, spatial)
    elif spec.input_size is not None:
        size = spec.input_size
    else:
        raise ValueError(f"conv layer {spec.name!r} has no traced input size; set pseudo_spatial to a size")
    return torch.randn(batch_size, spec.in_features, *size, generator=generator, dtype=dtype)


def layer_forward(params: Params, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """Run one layer (its own geometry) on ``x`` functionally."""
    if spec.kind == "linear":
        return F.linear(x, params["weight"], params.get("bias"))
    return F.conv2d(x, params["weight"], params.get("bias"), stride=spec.stride, padding=spec.padding,
                    dilation=spec.dilation, groups=spec.groups)


def teacher_output(params: Params, spec: LayerSpec, x: torch.Tensor, out: int) -> torch.Tensor:
    """A client layer on pseudo-data shaped for another layer: input width cropped / zero-padded to the client's,
    first ``out`` outputs only."""
    w, b = params["weight"].to(x), params.get("bias")
    b = None if b is None else b[:out].to(x)
    width = x.shape[1]
    if spec.kind == "linear":
        k = min(width, spec.in_features)
        return F.linear(x[:, :k], w[:out, :k], b)
    if spec.groups == 1:
        k = min(width, spec.in_features)
        return F.conv2d(x[:, :k], w[:out, :k], b, stride=spec.stride, padding=spec.padding, dilation=spec.dilation)
    if width >= spec.in_features:
        xx = x[:, : spec.in_features]
    else:
        xx = F.pad(x, (0, 0, 0, 0, 0, spec.in_features - width))
    full_b = params.get("bias")
    y = F.conv2d(xx, w, None if full_b is None else full_b.to(x), stride=spec.stride, padding=spec.padding,
                 dilation=spec.dilation, groups=spec.groups)
    return y[:, :out]


def center_crop_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop two (N, C, H, W) maps to their centred common spatial window (no-op for 2-d tensors)."""
    if a.ndim == 2:
        return a, b
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])

    def crop(t: torch.Tensor) -> torch.Tensor:
        top, left = (t.shape[-2] - h) // 2, (t.shape[-1] - w) // 2
        return t[..., top : top + h, left : left + w]

    return crop(a), crop(b)


def distillation_loss(global_params: Params, global_spec: LayerSpec,
                      teachers: Sequence[tuple[Params, LayerSpec]], x: torch.Tensor,
                      reduction: str = "sum_units", weights: Sequence[float] | None = None) -> torch.Tensor:
    """Eq. 3: mean over the mapped client layers of the squared output distance (see the module docstring);
    ``weights`` (summing to 1) replace the plain mean, e.g. for merged groups of client layers."""
    if reduction not in ("sum_units", "mean"):
        raise ValueError(f"distillation reduction must be 'sum_units' or 'mean', got {reduction!r}")
    if not teachers:
        raise ValueError(f"global layer {global_spec.name!r} has no client layer mapped onto it")
    y_global = layer_forward(global_params, global_spec, x)
    losses = []
    for params, spec in teachers:
        if spec.kind != global_spec.kind:
            raise ValueError(f"cannot distil {spec.kind} layer {spec.name!r} into {global_spec.kind} layer "
                             f"{global_spec.name!r}")
        out = min(spec.out_features, global_spec.out_features)
        with torch.no_grad():
            y_teacher = teacher_output(params, spec, x, out)
        a, b = center_crop_pair(y_global[:, :out], y_teacher)
        sq = (a - b).pow(2)
        losses.append(sq.mean() if reduction == "mean" else sq.sum(1).mean())
    if weights is None:
        return torch.stack(losses).mean()
    return (torch.stack(losses) * torch.tensor(weights, dtype=losses[0].dtype, device=losses[0].device)).sum()


def merge_teachers(teachers: Sequence[tuple[Params, LayerSpec]],
                   global_spec: LayerSpec) -> list[tuple[dict[str, torch.Tensor], LayerSpec, int]]:
    """Group client layers whose compared outputs are the same linear map of the pseudo-data and average each
    group's compared weights and biases (see the module docstring); returns ``(params, spec, group size)``."""
    width, groups = global_spec.in_features, {}
    for params, spec in teachers:
        out = min(spec.out_features, global_spec.out_features)
        ungrouped = spec.groups == 1
        k = min(width, spec.in_features) if ungrouped else spec.in_features
        # a grouped layer runs whole (all its outputs), so its own output width is part of what it computes
        key = (spec.kind, out, k, spec.kernel, spec.stride, spec.padding, spec.dilation, spec.groups,
               None if ungrouped else spec.out_features)
        w = params["weight"][:out, :k] if ungrouped else params["weight"]
        b = params.get("bias")
        b = torch.zeros(len(w), dtype=w.dtype) if b is None else b
        b = b[:out] if ungrouped else b
        entry = groups.setdefault(key, [torch.zeros(w.shape, dtype=torch.float64),
                                        torch.zeros(b.shape, dtype=torch.float64), 0, spec])
        entry[0] += w.detach().double().cpu()
        entry[1] += b.detach().double().cpu()
        entry[2] += 1
    dtype = teachers[0][0]["weight"].dtype
    merged = []
    for (_, out, k, *_), (w, b, n, spec) in groups.items():
        if spec.groups == 1:  # already cropped to the compared widths
            spec = replace(spec, in_features=k, out_features=out, groups=1, bias=True)
        merged.append(({"weight": (w / n).to(dtype), "bias": (b / n).to(dtype)}, spec, n))
    return merged


def distill_layer(global_params: Params, global_spec: LayerSpec, teachers: Sequence[tuple[Params, LayerSpec]],
                  steps: int = 5, lr: float = 0.01, batch_size: int = 64, generator: torch.Generator | None = None,
                  spatial: int | None = None,
                  reduction: str = "sum_units") -> tuple[dict[str, torch.Tensor], list[float]]:
    """Eqs. 3-5 for one global layer: ``steps`` gradient steps on fresh pseudo-data.

    Args:
        global_params: ``{"weight", "bias"?}`` of the global layer (not modified).
        global_spec: its spec (pseudo-data follow its input shape).
        teachers: ``(params, spec)`` of the client layers mapped onto it.
        steps: server gradient steps per round (our choice: 5; the paper does not say).
        lr: server learning rate alpha (paper: 0.01).
        batch_size: pseudo-batch size n (our choice: 64).
        generator: source of the pseudo-data (seed it for reproducible rounds).
        spatial: spatial size of conv pseudo-data; ``None`` = the layer's native input size.
        reduction: ``"sum_units"`` (default) or ``"mean"`` (see the module docstring).

    Returns:
        The updated parameters (detached, same dtype) and the loss before each step.

    Raises:
        NonFiniteTrainingError: if the loss or the updated parameters are NaN / inf (client layers that diverged, or
            a server learning rate that is too high).
    """
    if steps < 0 or lr < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0, lr >= 0, batch_size >= 1; got {steps}, {lr}, {batch_size}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in global_params.items()}
    merged = merge_teachers(teachers, global_spec)
    groups, weights = [(p, s) for p, s, _ in merged], [n / len(teachers) for _, _, n in merged]
    losses = []
    for step in range(steps):
        x = pseudo_input(global_spec, batch_size, generator, spatial, params["weight"].dtype)
        with torch.enable_grad():
            loss = distillation_loss(params, global_spec, groups, x.to(params["weight"].device), reduction=reduction,
                                     weights=weights)
            grads = torch.autograd.grad(loss, list(params.values()))
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise NonFiniteTrainingError(f"server distillation of global layer {global_spec.name!r}: the loss (Eq. 3) "
                                         f"is {losses[-1]} at step {step} (lr={lr:g}, {len(teachers)} client layers); "
                                         "a client layer diverged or the server learning rate is too high")
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p -= lr * g
    out = {k: v.detach() for k, v in params.items()}
    if not all(bool(torch.isfinite(v).all()) for v in out.values()):
        raise NonFiniteTrainingError(f"server distillation of global layer {global_spec.name!r}: the updated weights "
                                     f"are NaN or inf (lr={lr:g}); lower the server learning rate")
    return out, losses
