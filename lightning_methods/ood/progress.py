"""Progress lines of the EncMin2L pipeline (``lightning-methods ood``): one line when a stage starts and when it ends
(with its time), and, inside a stage, epoch / step lines of RDM and encoder fits and batch lines of the predict loops
(embedding, PF-ODE likelihoods). Plain lines on rank zero, not a redrawn bar, so they read the same in a terminal, a
log file or a notebook; throttled to one line per tenth of the work (once the loop has run ``min_s`` seconds) and at
least one per ``every_s`` seconds."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


def _duration(seconds: float) -> str:
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@contextlib.contextmanager
def stage_lines(stage: str, what: str, enabled: bool = True) -> Iterator[None]:
    """``[ood] <stage>: <what> ...`` at the start and ``[ood] <stage>: done in <time>`` at the end (rank zero)."""
    start = time.perf_counter()
    if enabled:
        rank_zero_info(f"[ood] {stage}: {what}")
    yield
    if enabled:
        rank_zero_info(f"[ood] {stage}: done in {_duration(time.perf_counter() - start)}")


class ProgressLines(Callback):
    """Epoch / step lines of a fit and batch lines of a predict loop, prefixed with the stage name.

    Args:
        stage: shown at the start of every line (``"rdm/cnn/raw"``).
        names: names of the predict dataloaders (the feature sets being scored), in order.
        every_s: a line at least this often (seconds), besides one per tenth of the work.
        min_s: loops shorter than this (seconds) print no lines (the stage's start / finish lines suffice).
    """

    def __init__(self, stage: str, names: list[str] | None = None, every_s: float = 30.0, min_s: float = 3.0) -> None:
        self.stage, self.names, self.every_s, self.min_s = stage, list(names or []), every_s, min_s
        self._start = self._last = 0.0
        self._tenth = -1
        self._done = 0

    def _due(self, fraction: float) -> bool:
        now = time.perf_counter()
        tenth = int(fraction * 10 + 1e-9)
        if now - self._start < self.min_s:
            return False
        if tenth > self._tenth or now - self._last >= self.every_s:
            self._tenth, self._last = tenth, now
            return True
        return False

    def _eta(self, fraction: float) -> str:
        elapsed = time.perf_counter() - self._start
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        return f"{_duration(elapsed)}" + (f", about {_duration(left)} left" if 0 < fraction < 1 else "")

    def _reset(self) -> None:
        self._start = self._last = time.perf_counter()
        self._tenth, self._done = 0, 0

    # ------------------------------------------------------------------------------------------- fit
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        if trainer.current_epoch:
            rank_zero_info(f"[ood] {self.stage}: resuming at epoch {trainer.current_epoch}/{trainer.max_epochs}")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epochs = max(int(trainer.max_epochs or 1), 1)
        fraction = (trainer.current_epoch + 1) / epochs
        if trainer.is_global_zero and self._due(fraction):
            loss = trainer.callback_metrics.get("train/loss_epoch")
            shown = f", loss {float(loss):.4f}" if loss is not None else ""
            rank_zero_info(f"[ood] {self.stage}: epoch {trainer.current_epoch + 1}/{epochs}, step "
                           f"{trainer.global_step}{shown} ({self._eta(fraction)})")

    # ------------------------------------------------------------------------------------------- predict
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._done += 1
        total = max(sum(int(n) for n in trainer.num_predict_batches), 1)
        fraction = self._done / total
        if trainer.is_global_zero and self._due(fraction):
            name = self.names[dataloader_idx] if dataloader_idx < len(self.names) else f"set {dataloader_idx}"
            per_set = int(trainer.num_predict_batches[dataloader_idx])
            rank_zero_info(f"[ood] {self.stage}: {name} batch {batch_idx + 1}/{per_set}, {self._done}/{total} "
                           f"batches in all ({self._eta(fraction)})")
