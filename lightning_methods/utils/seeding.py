"""Seed mixing: every random choice of the package is a function of integers (seed, epoch, step, rank, client, ...),
never of the global RNG, so resumed runs and other ranks draw exactly what an uninterrupted run draws."""

from __future__ import annotations

import numpy as np
import torch


def mix_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers with NumPy's ``SeedSequence`` (well spread even for nearby keys).

    Example: ``mix_seed(seed, epoch)`` for one epoch's order, ``mix_seed(seed, global_step, rank)`` for one batch's
    augmentation on one rank. Negative keys are not allowed (``SeedSequence`` refuses them).
    """
    if not keys:
        raise ValueError("mix_seed needs at least one integer key")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`mix_seed` of ``keys``."""
    return torch.Generator(device=device).manual_seed(mix_seed(*keys))
