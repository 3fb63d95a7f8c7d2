"""WarmupEMA: exponential moving average of the weights with score_sde's warm-up of the decay.

The EMA of "Score-Based Generative Modeling through Stochastic Differential Equations" (Song et al., arXiv 2011.13456;
``models/ema.py``), which the representation-space diffusion model reuses (arXiv 2504.07793; decay 0.9999):
after the ``k``-th optimizer step ``ema <- ema - (1 - d_k) (ema - w)`` with ``d_k = min(decay, (1 + k) / (10 + k))``,
starting from the initial weights. The warm-up lets short runs use a large decay.

Built on Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (checkpointing, resume, the swap for
validation and the copy of the average into the module when training ends).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging


class WarmupEMA(WeightAveraging):
    """EMA with decay ``min(decay, (1 + k) / (10 + k))`` after step ``k`` (see the module docstring).

    Args:
        decay: the final decay (0.9999 in the RDM code).
        warmup: use the ``(1 + k) / (10 + k)`` warm-up (score_sde's ``use_num_updates``); ``False`` is a plain EMA
            with a constant decay.
        use_buffers: also average buffers (as ``WeightAveraging``); parameters that are not trained keep their values.

    Raises:
        ValueError: ``decay`` outside ``[0, 1]``.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, use_buffers: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        super().__init__(use_buffers=use_buffers, avg_fn=self._average)

    def _average(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        # num_averaged counts the initial weights as the first update, so it equals the optimizer step k. It is a
        # device tensor and this runs once per parameter, so d_k = min(decay, (1 + k) / (10 + k)) is computed on the
        # device (float(k) would wait for the device once per parameter and step), in float64 with score_sde's own
        # operations: the same rate, bit for bit, as that Python arithmetic (float32 where the device has no float64)
        if not self.warmup:
            return averaged - (1.0 - self.decay) * (averaged - current)
        wide = torch.float32 if averaged.device.type == "mps" else torch.float64
        k = num_averaged.to(averaged.device, wide)
        rate = 1.0 - torch.clamp((1.0 + k) / (10.0 + k), max=self.decay)
        return averaged - rate.to(averaged.dtype) * (averaged - current)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # score_sde starts the average at the initial weights (a resumed run restores its own count instead)
        average = self._average_model
        if average is not None and int(average.n_averaged) == 0 and trainer.global_step == 0:
            average.update_parameters(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decay": self.decay, "warmup": self.warmup}
