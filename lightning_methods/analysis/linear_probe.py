"""Linear probes for many layers on frozen features (Alain and Bengio, arXiv 1610.01644; the per-layer probes of
Masarczyk et al., *The Tunnel Effect*, NeurIPS 2023, arXiv 2305.19753).

Each probe is a linear classifier ``W f + b`` on frozen, flattened features, trained with cross-entropy (plus
``weight_decay / 2 (|W|^2 + |b|^2)``). Two solvers:

- ``"lbfgs"`` (default): each probe is fitted **to convergence** on the whole cached training set (full-batch L-BFGS
  with a strong-Wolfe line search, from zero weights; the problem is convex, so the result depends neither on a seed
  nor on the sample order). It stops when the largest gradient entry is below ``tol`` or the loss stops changing (at
  the compute dtype's resolution), else after ``max_iter`` iterations; ``LinearProbe.converged`` says which. A probe
  on a model's own output layer (its logits) then reaches the model's accuracy (tested): the identity map is a
  linear probe, so an under-fitted probe, not the features, would be to blame for a lower number.
- ``"adam"``: the loop of the reimplementation DHLSmith/jons-tunnel-effect (Adam lr 1e-3, weight decay 0, batch 512,
  30 epochs, shuffled every epoch, ``nn.Linear`` default initialisation), reproduced to float64 round-off (tested). It
  is a fixed budget of steps, not a convergence criterion: on small data (1200 samples = 3 steps per epoch) it
  under-fits (27.9% for the logits of a 98.5% digits model).

With Adam, all probes of one call share one loop over the data: every step draws the same sample positions for every
layer, each probe gets its own parameters and its own Adam state, and the loss is the sum of the per-probe mean
losses, whose gradient for each probe is exactly that probe's own gradient. Training the probes together therefore
gives the same weights and accuracies as training each alone with the same seed (tested). Initialisation is seeded
per probe by ``(seed, crc32(name))``; the epoch orders by ``(seed, epoch)``. Both can be given explicitly (``init``,
``epoch_orders``) to reproduce another implementation's draws.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_methods.utils import seeded_generator

Solver = Literal["lbfgs", "adam"]


@dataclass
class LinearProbe:
    """A trained probe: ``logits = features @ weight.T + bias``. ``train_acc``: with L-BFGS the final probe's accuracy
    on the training features; with Adam the accuracy over the last epoch as the samples were seen (like the
    reimplementation's running epoch accuracy). ``iterations`` / ``converged``: L-BFGS iterations and whether a
    convergence criterion (not ``max_iter``) stopped it (``None`` for Adam)."""

    weight: torch.Tensor
    bias: torch.Tensor
    train_acc: float
    iterations: int = 0
    converged: bool | None = None

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        f = features.reshape(features.shape[0], -1).to(self.weight.device, self.weight.dtype)
        return f @ self.weight.T + self.bias


def probe_init(d: int, num_classes: int, name: str, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default initialisation (weight and bias uniform in ``+-1/sqrt(d)``), drawn from a generator
    seeded by ``(seed, crc32(name))`` so a probe's start does not depend on the other probes."""
    g = seeded_generator(seed, zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(d)
    w = torch.rand(num_classes, d, generator=g, dtype=dtype).mul_(2).sub_(1).mul_(bound)
    b = torch.rand(num_classes, generator=g, dtype=dtype).mul_(2).sub_(1).mul_(bound)
    return w, b


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one probe epoch, a function of ``(seed, epoch)`` only."""
    return torch.randperm(n, generator=seeded_generator(seed, epoch, 37))


def _check(features: Mapping[str, torch.Tensor], targets: torch.Tensor, num_classes: int) -> int:
    if not features:
        raise ValueError("train_linear_probes needs at least one feature tensor")
    n = targets.shape[0]
    bad = {k: tuple(v.shape) for k, v in features.items() if v.shape[0] != n}
    if bad:
        raise ValueError(f"features must have one row per target ({n}); got {bad}")
    if n and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got [{int(targets.min())}, {int(targets.max())}]")
    return n


def train_linear_probes(
    features: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    num_classes: int,
    *,
    solver: Solver = "lbfgs",
    epochs: int = 30,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_iter: int = 1000,
    tol: float = 1e-6,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    init: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    epoch_orders: Sequence[torch.Tensor] | None = None,
) -> dict[str, LinearProbe]:
    """Train one linear probe per entry of ``features``.

    Args:
        features: ``{name: (N, d) tensor}`` (any dtype; rows are cast to ``dtype`` on the device batch by batch).
            Tensors already on ``device`` are used in place; host tensors are sliced per batch.
        targets: ``(N,)`` int64 labels in ``[0, num_classes)``.
        num_classes: number of classes of every probe.
        solver: ``"lbfgs"`` (to convergence, default) or ``"adam"`` (the reimplementation's fixed loop).
        epochs: Adam: passes over the data (paper reimplementation: 30).
        batch_size: Adam: samples per step (512); L-BFGS: rows per chunk of the full-batch loss (memory only).
        lr: Adam learning rate (1e-3).
        weight_decay: L2 coefficient ``lambda`` of ``lambda / 2 (|W|^2 + |b|^2)`` (Adam's coupled weight decay; 0).
        max_iter: L-BFGS: most iterations per probe (1000).
        tol: L-BFGS: stop when the largest gradient entry of the mean loss is below ``tol`` (1e-6).
        seed: Adam: seed of the initialisation and the epoch orders.
        device: where the probes train (default: the device of the first feature tensor).
        dtype: compute dtype of the probes (float32; float64 for exact comparisons).
        init: optional ``{name: (weight, bias)}`` starting points (default: Adam :func:`probe_init`, L-BFGS zeros).
        epoch_orders: Adam: optional explicit sample order of every epoch (default: :func:`epoch_order`).

    Returns:
        ``{name: LinearProbe}`` with weights on ``device``.

    Raises:
        ValueError: mismatched lengths, labels out of range, an unknown solver, or fewer epoch orders than epochs.
    """
    if solver not in ("lbfgs", "adam"):
        raise ValueError(f"solver must be 'lbfgs' or 'adam', got {solver!r}")
    if max_iter < 1 or tol <= 0:
        raise ValueError(f"max_iter must be >= 1 and tol > 0, got max_iter={max_iter}, tol={tol}")
    with torch.inference_mode(False), torch.enable_grad():
        if solver == "lbfgs":
            n = _check(features, targets, num_classes)
            dev = torch.device(device) if device is not None else features[next(iter(features))].device
            return {
                name: _fit_lbfgs(
                    name,
                    f,
                    targets,
                    num_classes,
                    n,
                    weight_decay=weight_decay,
                    max_iter=max_iter,
                    tol=tol,
                    chunk=batch_size,
                    device=dev,
                    dtype=dtype,
                    init=None if init is None else init[name],
                )
                for name, f in features.items()
            }
        return _train(
            features,
            targets,
            num_classes,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            device=device,
            dtype=dtype,
            init=init,
            epoch_orders=epoch_orders,
        )


def _fit_lbfgs(name: str, features: torch.Tensor, targets: torch.Tensor, num_classes: int, n: int, *,
               weight_decay: float, max_iter: int, tol: float, chunk: int, device: torch.device, dtype: torch.dtype,
               init: tuple[torch.Tensor, torch.Tensor] | None) -> LinearProbe:
    """One probe by full-batch L-BFGS on the mean cross-entropy (+ L2), chunked over rows."""
    f = features.reshape(n, -1)
    if init is None:
        w = torch.zeros(num_classes, f.shape[1], device=device, dtype=dtype, requires_grad=True)
        b = torch.zeros(num_classes, device=device, dtype=dtype, requires_grad=True)
    else:
        w, b = (t.detach().to(device, dtype).clone().requires_grad_(True) for t in init)
    y = targets.to(device)
    chunk = max(chunk, 4096)
    eps = torch.finfo(dtype).eps
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=10 * eps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        total = torch.zeros((), device=device, dtype=dtype)
        for start in range(0, n, chunk):
            x = f[start : start + chunk].to(device, dtype, non_blocking=True)
            loss = F.cross_entropy(x @ w.T + b, y[start : start + chunk], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        if weight_decay:
            reg = 0.5 * weight_decay * (w.square().sum() + b.square().sum())
            reg.backward()
            total += reg.detach()
        return total

    if n:
        opt.step(closure)
    state = opt.state[w]
    iterations = int(state.get("n_iter", 0))
    closure()
    grad_max = max(float(w.grad.abs().max()), float(b.grad.abs().max())) if n else 0.0
    probe = LinearProbe(w.detach(), b.detach(), float("nan"), iterations, iterations < max_iter or grad_max <= tol)
    if n:
        probe.train_acc = probe_accuracy({name: probe}, {name: f}, targets)[name]
    return probe


def _train(features: Mapping[str, torch.Tensor], targets: torch.Tensor, num_classes: int, epochs: int,
           batch_size: int, lr: float, weight_decay: float, seed: int, device: torch.device | str | None,
           dtype: torch.dtype, init: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
           epoch_orders: Sequence[torch.Tensor] | None) -> dict[str, LinearProbe]:
    n = _check(features, targets, num_classes)
    names = list(features)
    device = torch.device(device) if device is not None else features[names[0]].device
    if epoch_orders is not None and len(epoch_orders) < epochs:
        raise ValueError(f"epoch_orders has {len(epoch_orders)} orders for {epochs} epochs")
    params: dict[str, list[torch.Tensor]] = {}
    for name in names:
        d = features[name].reshape(n, -1).shape[1]
        w, b = init[name] if init is not None else probe_init(d, num_classes, name, seed, dtype)
        params[name] = [w.detach().to(device, dtype).clone().requires_grad_(True),
                        b.detach().to(device, dtype).clone().requires_grad_(True)]
    opt = torch.optim.Adam([p for ps in params.values() for p in ps], lr=lr, weight_decay=weight_decay)
    y_all = targets.to(device)
    correct = {name: torch.zeros((), device=device, dtype=torch.long) for name in names}
    for epoch in range(epochs):
        order = epoch_orders[epoch] if epoch_orders is not None else epoch_order(n, seed, epoch)
        last = epoch == epochs - 1
        for idx in order.split(batch_size):
            y = y_all[idx.to(device)]
            loss = torch.zeros((), device=device, dtype=dtype)
            for name in names:
                f = features[name]
                x = f[idx.to(f.device)].reshape(len(idx), -1).to(device, dtype, non_blocking=True)
                w, b = params[name]
                logits = x @ w.T + b
                loss = loss + F.cross_entropy(logits, y)
                if last:
                    correct[name] += (logits.detach().argmax(1) == y).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {name: LinearProbe(params[name][0].detach(), params[name][1].detach(),
                              float(correct[name]) / max(n, 1) if epochs else float("nan"))
            for name in names}


@torch.no_grad()
def probe_accuracy(probes: Mapping[str, LinearProbe], features: Mapping[str, torch.Tensor], targets: torch.Tensor,
                   batch_size: int = 4096) -> dict[str, float]:
    """Accuracy of every probe on ``features[name]`` / ``targets`` (evaluated in batches on the probe's device)."""
    out = {}
    for name, probe in probes.items():
        f = features[name]
        y = targets.to(probe.weight.device)
        hits = torch.zeros((), dtype=torch.long, device=probe.weight.device)
        for start in range(0, len(y), batch_size):
            hits += (probe.logits(f[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum()
        out[name] = float(hits) / max(len(y), 1)
    return out
