"""Linear probes for many layers trained together on the device (Alain and Bengio, arXiv 1610.01644; the per-layer
probes of Masarczyk et al., *The Tunnel Effect*, NeurIPS 2023, arXiv 2305.19753).

Each probe is a linear classifier ``W f + b`` on frozen, flattened features, trained with cross-entropy and Adam
(reimplementation DHLSmith/jons-tunnel-effect: lr 1e-3, weight decay 0, batch 512, 30 epochs, shuffled every epoch,
``nn.Linear`` default initialisation). All probes of one call share one loop over the data: every step draws the same
sample positions for every layer, each probe gets its own parameters and its own Adam state, and the loss is the sum
of the per-probe mean losses, whose gradient for each probe is exactly that probe's own gradient. Training the probes
together therefore gives the same weights and accuracies as training each alone with the same seed (tested), in one
pass over the data instead of one per layer.

Initialisation is seeded per probe by ``(seed, crc32(name))``; the epoch orders by ``(seed, epoch)``. Both can be
given explicitly (``init``, ``epoch_orders``) to reproduce another implementation's draws.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_methods.utils import seeded_generator


@dataclass
class LinearProbe:
    """A trained probe: ``logits = features @ weight.T + bias``; ``train_acc`` is the accuracy over the last epoch
    (as the samples were seen, like the reimplementation's running epoch accuracy)."""

    weight: torch.Tensor
    bias: torch.Tensor
    train_acc: float

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
    epochs: int = 30,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    init: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    epoch_orders: Sequence[torch.Tensor] | None = None,
) -> dict[str, LinearProbe]:
    """Train one linear probe per entry of ``features``, all in the same loop.

    Args:
        features: ``{name: (N, d) tensor}`` (any dtype; rows are cast to ``dtype`` on the device batch by batch).
            Tensors already on ``device`` are used in place; host tensors are sliced per batch.
        targets: ``(N,)`` int64 labels in ``[0, num_classes)``.
        num_classes: number of classes of every probe.
        epochs: passes over the data (paper reimplementation: 30).
        batch_size: samples per step (512).
        lr: Adam learning rate (1e-3).
        weight_decay: Adam weight decay (0).
        seed: seed of the initialisation and the epoch orders.
        device: where the probes train (default: the device of the first feature tensor).
        dtype: compute dtype of the probes (float32; float64 for exact comparisons).
        init: optional ``{name: (weight, bias)}`` starting points (default: :func:`probe_init`).
        epoch_orders: optional explicit sample order of every epoch (default: :func:`epoch_order`).

    Returns:
        ``{name: LinearProbe}`` with weights on ``device``.

    Raises:
        ValueError: mismatched lengths, labels out of range, or fewer epoch orders than epochs.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(features, targets, num_classes, epochs, batch_size, lr, weight_decay, seed, device, dtype, init,
                      epoch_orders)


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
