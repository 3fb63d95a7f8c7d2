"""Features of many named modules from one forward pass: forward hooks, streamed to host memory.

Used by the Tunnel Effect probe (Masarczyk et al., *The Tunnel Effect: Building Data Representations in Deep Neural
Networks*, NeurIPS 2023, arXiv 2305.19753) and by any analysis that needs per-layer representations.

A :class:`ProbePoint` names a module (dotted path as in ``model.named_modules()``) and an optional activation applied
to its output (``"relu"`` for networks that apply their last nonlinearity functionally, after a BatchNorm module).
:func:`extract_features` runs the model once per batch with a hook on every point: each hook applies the activation,
optionally average-pools spatial maps to at most ``pool_size x pool_size``, flattens, and copies the rows into a
preallocated host buffer (fp32, fp16 or bf16). The model runs in eval mode without gradients; the train/eval flag of
every submodule is restored afterwards, so parameters and BatchNorm statistics never change.

Peak host memory of one extraction is ``n_samples * sum_l d_l * bytes_per_element`` (:func:`feature_bytes`);
:func:`check_feature_memory` stops before the pass when that exceeds a budget and says how to shrink it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.utils import seeded_generator

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ProbePoint:
    """One representation to read.

    Args:
        name: label of the point in tables and plots (e.g. ``"conv3"``).
        module: dotted name of the module whose output is read (``""`` = the model itself).
        activation: ``None``, or ``"relu"`` / ``"gelu"`` / ``"silu"`` applied to that output (for nonlinearities
            applied functionally in ``forward``).
    """

    name: str
    module: str
    activation: str | None = None

    def __post_init__(self) -> None:
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"probe point {self.name!r}: activation must be None or one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")


@dataclass
class FeatureSet:
    """Features of one data split: ``features[name]`` is ``(N, d)`` on the host, rows aligned with ``targets`` and
    ``index`` (the sample positions, used to gather across ranks without duplicates)."""

    features: dict[str, torch.Tensor]
    targets: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


class _StopForward(Exception):
    """Raised by the last hook of a pass: the layers after the last probe point are not computed."""


def storage_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` (or a dtype) -> dtype; raises ``ValueError`` otherwise."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"feature dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def seeded_subset(n: int, k: int | None, seed: int) -> torch.Tensor:
    """Sorted positions of a seeded random subset of size ``min(k, n)`` of ``range(n)`` (all positions when ``k`` is
    None or >= n). Depends only on ``(n, k, seed)``."""
    if k is None or k >= n:
        return torch.arange(n)
    if k <= 0:
        raise ValueError(f"a subset needs k >= 1 samples, got {k}")
    return torch.randperm(n, generator=seeded_generator(seed, n, 17))[:k].sort().values


def resolve_modules(model: nn.Module, points: Sequence[ProbePoint]) -> dict[str, nn.Module]:
    """``{point name: module}``; raises ``ValueError`` naming unknown modules (with close matches) and duplicates."""
    import difflib

    names = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for p in points:
        if p.name in out:
            raise ValueError(f"probe point name {p.name!r} is used twice; names must be unique")
        if p.module not in names:
            close = difflib.get_close_matches(p.module, list(names), n=5, cutoff=0.5)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise ValueError(
                f"probe point {p.name!r}: {type(model).__name__} has no module named {p.module!r}.{hint} List the "
                "module names with `lightning-methods probe --list_points ...` or `dict(model.named_modules())`."
            )
        out[p.name] = names[p.module]
    return out


def _transform(out: Any, point: ProbePoint, pool_size: int | None) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"probe point {point.name!r} ({point.module!r}) returned {type(out).__name__}, not a tensor")
    out = out.detach()
    if point.activation is not None:
        out = ACTIVATIONS[point.activation](out)
    if pool_size is not None and out.ndim == 4 and (out.shape[-1] > pool_size or out.shape[-2] > pool_size):
        out = F.adaptive_avg_pool2d(out, (min(out.shape[-2], pool_size), min(out.shape[-1], pool_size)))
    return out.flatten(1)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode and restore each one's own ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


class _Recorder:
    """Hooks that write each point's rows into preallocated host buffers."""

    def __init__(self, model: nn.Module, points: Sequence[ProbePoint], pool_size: int | None, dtype: torch.dtype,
                 stop_early: bool) -> None:
        self.points = list(points)
        self.modules = resolve_modules(model, self.points)
        self.pool_size, self.dtype, self.stop_early = pool_size, dtype, stop_early
        self.buffers: dict[str, torch.Tensor] = {}
        self.capacity = 0
        self.start = 0
        self.calls: dict[str, int] = {}
        self.dims: dict[str, int] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        for p in self.points:
            self.handles.append(self.modules[p.name].register_forward_hook(self._hook(p)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, point: ProbePoint) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.calls[point.name] = self.calls.get(point.name, 0) + 1
            if self.calls[point.name] > 1:
                raise RuntimeError(
                    f"probe point {point.name!r}: module {point.module!r} runs more than once per forward pass (a "
                    "shared module, e.g. one ReLU reused by several layers); name a module that runs once, or the "
                    "module before it with activation='relu'"
                )
            rows = _transform(output, point, self.pool_size)
            self.dims[point.name] = rows.shape[1]
            if self.capacity:
                buf = self.buffers.get(point.name)
                if buf is None:
                    buf = self.buffers[point.name] = torch.empty((self.capacity, rows.shape[1]), dtype=self.dtype)
                buf[self.start : self.start + rows.shape[0]].copy_(rows)
            if self.stop_early and len(self.calls) == len(self.points):
                raise _StopForward

        return hook

    def run(self, forward: Callable[[torch.Tensor], Any], x: torch.Tensor) -> None:
        self.calls = {}
        try:
            forward(x)
        except _StopForward:
            pass
        missing = [p.name for p in self.points if p.name not in self.calls]
        if missing:
            raise RuntimeError(f"probe points {missing} were not reached in the forward pass: their modules are not "
                               "used by forward(); choose modules that run")


def feature_dims(model: nn.Module, points: Sequence[ProbePoint], example: torch.Tensor,
                 pool_size: int | None = None, forward: Callable[[torch.Tensor], Any] | None = None) -> dict[str, int]:
    """Flattened feature size of every point for inputs shaped like ``example`` (one complete no-grad eval forward
    pass, which also refuses modules that run more than once per pass)."""
    rec = _Recorder(model, points, pool_size, torch.float32, stop_early=False)
    with eval_mode(model), torch.no_grad(), rec:
        rec.run(forward or model, example)
    return {p.name: rec.dims[p.name] for p in points}


def feature_bytes(dims: Mapping[str, int], n_samples: int, dtype: str | torch.dtype = "float32") -> int:
    """Host bytes of ``n_samples`` rows of every point: ``n_samples * sum(dims) * bytes_per_element``."""
    return int(n_samples) * sum(dims.values()) * storage_dtype(dtype).itemsize


def human_bytes(n: float) -> str:
    """``12.2 GiB`` / ``46.4 MiB``."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_feature_memory(dims: Mapping[str, int], n_samples: int, dtype: str | torch.dtype,
                         budget_gb: float | None, what: str = "the probe features") -> int:
    """Raise ``MemoryError`` with the estimated size and the ways to shrink it when the features of ``n_samples``
    samples exceed ``budget_gb`` GiB; returns the estimate in bytes."""
    est = feature_bytes(dims, n_samples, dtype)
    if budget_gb is not None and est > budget_gb * 2**30:
        widest = max(dims, key=dims.get)
        raise MemoryError(
            f"{what} need an estimated {human_bytes(est)} of host memory ({n_samples} samples x "
            f"{sum(dims.values())} features over {len(dims)} probe points, {storage_dtype(dtype)}; widest point "
            f"{widest!r}: {dims[widest]} features), above the budget of {budget_gb:g} GiB. Options: pool the feature "
            "maps (pool_size=4 averages them to at most 4x4), subsample the samples (max_train_samples / "
            "max_test_samples, e.g. 10000), store features in half precision (feature_dtype='float16'), probe fewer "
            "points (points=[...]), or raise memory_budget_gb if the machine has the memory."
        )
    return est


def extract_features(
    model: nn.Module,
    points: Sequence[ProbePoint],
    batches: Iterable[Mapping[str, torch.Tensor]],
    n_samples: int,
    prepare: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    forward: Callable[[torch.Tensor], Any] | None = None,
    pool_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    stop_early: bool = True,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> FeatureSet:
    """Features of every probe point for all batches, one forward pass per batch.

    Args:
        model: the network holding the modules named by ``points`` (put in eval mode for the pass, flags restored).
        points: the probe points, in any order.
        batches: dict batches with ``"image"``, ``"target"`` and ``"index"``.
        n_samples: upper bound on the number of rows (the buffers are preallocated; extra rows raise).
        prepare: batch -> model input on the device (default: ``batch["image"]``).
        forward: the callable run on the input (default: ``model``; e.g. a LightningModule wrapping it).
        pool_size: average-pool spatial maps to at most ``pool_size x pool_size`` before flattening (None: no pooling).
        dtype: host storage dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        stop_early: skip the layers after the last probe point (a module that runs twice per pass is then only
            detected by :func:`feature_dims`, which the tunnel probe always runs first).
        context: factory of a context manager wrapped around each forward (e.g. autocast of the training precision).

    Returns:
        A :class:`FeatureSet` with ``(N, d)`` host tensors.

    Raises:
        ValueError: unknown module names. RuntimeError: a module runs twice per pass or never.
    """
    rec = _Recorder(model, points, pool_size, storage_dtype(dtype), stop_early)
    rec.capacity = max(int(n_samples), 1)
    targets, index = [], []
    run = forward or model
    with eval_mode(model), torch.no_grad(), rec:
        for batch in batches:
            x = prepare(batch) if prepare is not None else batch["image"]
            n = x.shape[0]
            if rec.start + n > rec.capacity:
                raise RuntimeError(f"extract_features got more than n_samples={n_samples} rows")
            with context() if context is not None else contextlib.nullcontext():
                rec.run(run, x)
            targets.append(batch["target"].detach().cpu())
            index.append(batch["index"].detach().cpu())
            rec.start += n
    n = rec.start
    feats = {p.name: rec.buffers[p.name][:n] if p.name in rec.buffers else torch.empty(0, 0) for p in points}
    empty = torch.empty(0, dtype=torch.long)
    return FeatureSet(feats, torch.cat(targets) if targets else empty, torch.cat(index) if index else empty)
