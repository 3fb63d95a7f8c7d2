"""Lightning callback that logs the internal statistics of KOALA-family optimizers.

Papers: KOALA (arXiv 2107.03331) and KOALA++ (arXiv 2506.04432). Logged keys (per optimizer; ``koala/`` prefix):
``R`` (measurement noise), ``s_clamps`` (cumulative number of clamped innovation covariances S, a safety guard of
this package), and the covariance of KOALA-V (``P``) or KOALA-M (``P_xx``, ``P_xv``, ``P_vv``, ``q_x``).

The values are device tensors handed to ``LightningModule.log``; Lightning converts them to numbers only when it
writes to the logger (every ``trainer.log_every_n_steps`` steps), so the callback adds no per-step host sync.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_methods.optim.koala_base import KOALABase


class KOALAMonitor(Callback):
    """Log KOALA optimizer statistics every training step (written at the logger's interval).

    Args:
        prefix: metric name prefix; a second KOALA optimizer of the same module logs under ``{prefix}{index}/``.
    """

    def __init__(self, prefix: str = "koala/") -> None:
        self.prefix = prefix

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        koalas = [opt for opt in trainer.optimizers if isinstance(getattr(opt, "optimizer", opt), KOALABase)]
        for i, opt in enumerate(koalas):
            opt = getattr(opt, "optimizer", opt)
            prefix = self.prefix if i == 0 else f"{self.prefix}{i}/"
            for name, value in opt.statistics().items():
                pl_module.log(prefix + name, value.float(), on_step=True, on_epoch=False, batch_size=1)
