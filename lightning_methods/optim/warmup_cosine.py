"""Linear warm-up followed by cosine annealing, as one ``torch.optim.lr_scheduler.LRScheduler`` (so a YAML config can
name it as ``model.init_args.lr_scheduler.class_path``; torch's ``SequentialLR`` needs scheduler objects, which
YAML cannot express).

The usual recipe for training vision transformers from scratch (DeiT, CCT): ``lr(t) = base * (t + 1) / warmup``
for ``t < warmup``, then ``eta_min + (base - eta_min) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2``,
constant ``eta_min`` after ``total``. ``t`` counts ``scheduler.step()`` calls: epochs with the classifier's
``scheduler_interval: epoch``, optimizer steps with ``"step"``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """Linear warm-up to the base learning rate, then cosine decay to ``eta_min``.

    Args:
        optimizer: the wrapped optimizer (its groups' ``lr`` are the base rates).
        warmup_iters: warm-up length in scheduler steps (0 disables the warm-up).
        max_iters: total schedule length in scheduler steps (warm-up included).
        eta_min: final learning rate.
        last_epoch: index of the last step (-1 to start), as for every torch scheduler.

    Raises:
        ValueError: if ``max_iters <= warmup_iters`` or a length is negative.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_iters: int = 10, max_iters: int = 200,
                 eta_min: float = 0.0, last_epoch: int = -1) -> None:
        if warmup_iters < 0 or max_iters <= warmup_iters:
            raise ValueError(f"need 0 <= warmup_iters < max_iters, got warmup_iters={warmup_iters}, "
                             f"max_iters={max_iters}")
        self.warmup_iters, self.max_iters, self.eta_min = warmup_iters, max_iters, eta_min
        super().__init__(optimizer, last_epoch)

    def factor_lr(self, base: float, t: int) -> float:
        """Learning rate at step ``t`` for base rate ``base``."""
        if t < self.warmup_iters:
            return base * (t + 1) / self.warmup_iters
        progress = min((t - self.warmup_iters) / (self.max_iters - self.warmup_iters), 1.0)
        return self.eta_min + (base - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.factor_lr(base, self.last_epoch) for base in self.base_lrs]
