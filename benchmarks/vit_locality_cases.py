"""vit_locality section: ViT-Lite-7/4 training steps with fused vs explicit attention, and the cost of the
AttentionLocality probe run every 10 epochs ("Inducing Spatial Locality in Vision Transformers through the Training
Protocol", arXiv 2605.16390).

Cases (baseline first; ratio = time per unit / baseline time per step):
- the training step with timm's fused attention (what training uses);
- the same step with explicit attention (``fused_attn=False``, what a probe that switched the model would cost if
  left on);
- the training step plus one probe every 10 epochs, amortised per step: baseline step time (median of the baseline
  repeats of this run) + probe time / (10 x steps per CIFAR epoch at this batch size). Its ratio - 1 is the probe's
  share of an epoch (target: under 2%);
- one probe alone (forward passes over the probe images, gather, .npy/.json files, three PNGs), per probe.

Small mode uses a 2-block, 64-wide ViT and 16 probe images; CPU mode the real ViT-Lite at batch <= 32 and 200 probe
images (the amortised case scales the whole probe time linearly to 1,000 images, an overestimate since the files and
PNGs do not grow); full mode the real ViT-Lite at the section batch size and 1,000 probe images.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import torch

from lightning_methods.callbacks import AttentionLocality
from lightning_methods.datamodules import IndexedTensorDataset
from lightning_methods.vit_locality import ViTLocalityClassifier
from lightning_methods.vit_locality.settings import LocalitySettings

from harness import Settings, data, sync, time_trainer

CIFAR_TRAIN = 50_000


def cases(s: Settings) -> list[tuple]:
    small = s.n_train <= 256
    kwargs = {"embed_dim": 64, "depth": 2, "num_heads": 4} if small else {}
    batch = s.batch_size if s.device.startswith("cuda") else min(s.batch_size, 32)
    n_probe = 16 if small else (1000 if s.device.startswith("cuda") else 200)
    steps_per_epoch = CIFAR_TRAIN // batch

    def model() -> ViTLocalityClassifier:
        return ViTLocalityClassifier(backbone="vit_lite_7_4", num_classes=100, backbone_kwargs=kwargs,
                                     optimizer=partial(torch.optim.AdamW, lr=5e-4, weight_decay=0.05))

    def step(fused: bool) -> Callable[[], float]:
        def run() -> float:
            m = model()
            for block in m.backbone.blocks:
                block.attn.fused_attn = fused
            return time_trainer(s, m, data(s, batch_size=batch, gpu_resident=True))
        return run

    def probe_seconds() -> float:
        device = torch.device(s.device)
        m = model().to(device)
        images = torch.randint(0, 256, (n_probe, 3, 32, 32), dtype=torch.uint8)
        dm = SimpleNamespace(test_set=IndexedTensorDataset(images, torch.zeros(n_probe, dtype=torch.long)),
                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        with tempfile.TemporaryDirectory() as out:
            trainer = SimpleNamespace(datamodule=dm, world_size=1, global_rank=0, is_global_zero=True, global_step=0,
                                      current_epoch=0, loggers=[], checkpoint_callback=None, default_root_dir=out)
            cb = AttentionLocality(settings=LocalitySettings(num_images=n_probe, batch_size=min(n_probe, 250)),
                                   out_dir=out)
            cb.on_fit_start(trainer, m)
            sync(s.device)
            t0 = time.perf_counter()
            cb.probe(trainer, m, epochs_done=10)
            sync(s.device)
            return time.perf_counter() - t0

    def amortised() -> float:
        # its own step in the same round (the ratio is per round; the baseline's earlier calls include its warm-up)
        return step(True)() + probe_seconds() * max(1.0, 1000 / n_probe) / (10 * steps_per_epoch)

    vit = "ViT-Lite-7/4" if not small else "2-block ViT"
    return [
        (f"{vit} step, fused attention, batch {batch} (baseline)", step(True), batch),
        (f"{vit} step, explicit attention (fused_attn=False)", step(False), batch),
        (f"step + locality probe (1000 images) every 10 epochs of {steps_per_epoch} steps, amortised", amortised,
         batch),
        (f"locality probe alone, {n_probe} images (files + PNGs), per probe", probe_seconds, n_probe),
    ]
