"""Section ``quantization``: cost of one training epoch of multi-bit training, every row per epoch on the same data.

Baseline: one Any-Precision epoch (bits 1, 2, 4, 8, 32 on every full batch, switchable BN, recursive supervision).
Rows: EMQ epochs (WBC + shared BN + bit-wise coresets) at prune rates 0.8 and 0.6 with and without the re-scoring pass
(a refresh epoch includes scoring every training sample at every bit-width), WBC + shared BN on the full data, and
one-bit-width epochs (float ``ImageClassifier``; the multi-bit model at 8 bits; at 1 bit with WBC) whose ratio to the
float row is the overhead of the quantized forward/backward per bit-width pass, and the LSQ quantizer's epoch and
8-bit pass against the DoReFa ones (the cost of learned step sizes).

Targets (issue 12): EMQ epoch at p = 0.8 <= 0.3x the Any-Precision epoch including scoring (ideal 0.2x); quantized pass
<= 1.5x the float pass on a GPU. Model: ResNet-20x5 on a GPU (full mode), pre-activation ResNet-8 on a CPU.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import BitwiseCoresetCallback
from lightning_methods.quantization import MultiBitClassifier

from harness import Settings, data, sync

Case = tuple[str, Callable[[], float], int]


class EpochTimer(Callback):
    """Wall time of the training part of each epoch (device synchronized at both ends)."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self._t0 = device, [], 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._t0)


def _setup(s: Settings) -> tuple[str, dict[str, Any], int, int]:
    if s.device.startswith("cuda"):
        return "resnet20x5", {}, 128, s.n_train
    if s.steps <= 2:  # small mode: seconds
        return "preact_resnet8", {"width": 0.25}, 16, 32
    return "preact_resnet8", {}, 64, min(s.n_train, 1024)


def time_epoch(s: Settings, model: L.LightningModule, epochs: int, callbacks: list[Callback] | None = None) -> float:
    """Seconds of the last of ``epochs`` epochs (scoring of that epoch included for multi-bit models)."""
    _, _, batch, n = _setup(s)
    timer = EpochTimer(s.device)
    trainer = L.Trainer(accelerator="gpu" if s.device.startswith("cuda") else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, max_epochs=epochs, precision=s.precision, benchmark=True,
                        reload_dataloaders_every_n_epochs=1, callbacks=[timer, *(callbacks or [])])
    dm = data(s, n_train=n, batch_size=batch, gpu_resident=s.device.startswith("cuda"), num_workers=0)
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(model, dm)
    scoring = model.cost.history[-1]["score_time_s"] if isinstance(model, MultiBitClassifier) else 0.0
    return timer.times[-1] + scoring


def cases(s: Settings) -> list[Case]:
    backbone, kw, _, n = _setup(s)
    adam = partial(torch.optim.Adam, lr=1e-3)
    common = dict(backbone=backbone, backbone_kwargs=kw, num_classes=100, optimizer=adam, eval_bits=[1],
                  bn_recalibration="none")

    def multibit(epochs: int = 2, coreset: dict[str, Any] | None = None, **model_kw: Any) -> Callable[[], float]:
        def run() -> float:
            callbacks = [BitwiseCoresetCallback(**coreset)] if coreset else []
            return time_epoch(s, MultiBitClassifier(**{**common, **model_kw}), epochs, callbacks)

        return run

    def float_epoch() -> float:
        return time_epoch(s, ImageClassifier(backbone, 100, optimizer=adam, backbone_kwargs=kw), 2)

    anyprecision = dict(shared_bn=False, wbc=False, supervision="recursive")
    emq = dict(shared_bn=True, wbc=True, supervision="hard")
    return [
        ("Any-Precision epoch, 5 bit-widths on full data, per epoch (baseline)", multibit(**anyprecision), n),
        ("EMQ epoch p=0.8, refresh epoch (scoring incl.), per epoch",
         multibit(coreset=dict(prune_rate=0.8, warmup_full=1, refresh_every=2), **emq), n),
        ("EMQ epoch p=0.8, no refresh, per epoch",
         multibit(3, coreset=dict(prune_rate=0.8, warmup_full=1, refresh_every=2), **emq), n),
        ("EMQ epoch p=0.6, refresh epoch (scoring incl.), per epoch",
         multibit(coreset=dict(prune_rate=0.6, warmup_full=1, refresh_every=2), **emq), n),
        ("WBC + shared BN on full data, per epoch", multibit(**emq), n),
        ("float model, 1 pass (ImageClassifier), per epoch", float_epoch, n),
        ("multi-bit model, 1 pass at 8 bits, per epoch", multibit(bits=[8], **anyprecision), n),
        ("multi-bit model, 1 pass at 1 bit with WBC, per epoch", multibit(bits=[1], **emq), n),
        ("Any-Precision epoch with LSQ quantizers (learned steps), per epoch",
         multibit(quantizer="lsq", **anyprecision), n),
        ("multi-bit model, 1 pass at 8 bits with LSQ, per epoch",
         multibit(bits=[8], quantizer="lsq", **anyprecision), n),
    ]
