"""ood section: the EncMin2L pipeline's two heavy stages (Bhuyan, arXiv 2605.20502; RDM of arXiv 2504.07793).

Cases (every time is per sample; ratio = time per sample / the first row):
- PF-ODE likelihood one sample at a time (baseline): one adaptive fehlberg2 solve (rtol = atol = 1e-5, Hutchinson
  with one Rademacher probe, float64 state) per sample, as a loop over samples;
- PF-ODE likelihood batched: the same samples in one solve of the whole batch (the pipeline's scoring). Target:
  batched >= 20x faster per sample than one at a time on CPU (ratio <= 0.05);
- embedding in predict mode: a CIFAR ResNet encoder (EncoderModule) through ``Trainer.predict`` with the settings'
  precision (bf16 on GPUs in full mode), gathered per sample as the pipeline does; images/s is its throughput.

The score network is randomly initialised with non-zero output layers (a zero-initialised network has a trivial flow).
Sizes: small mode (smoke test) d 16, width 64, 2 blocks, 32 samples, resnet8 on 64 images; CPU mode d 64, width 256,
4 blocks, 256 samples, resnet18 on 512 images; full mode (GPU) the paper's RDM (d 768, width 1536, 12 blocks), 1024
samples, resnet18 on 8192 images.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning as L
import torch

from lightning_methods.datamodules import load_digits_uint8
from lightning_methods.ood.embedding import embed
from lightning_methods.ood.encoders import EncoderSpec, build_encoder
from lightning_methods.ood.likelihood import pf_ode_likelihood
from lightning_methods.ood.score_net import ScoreMLP
from lightning_methods.ood.sde import VPSDE

from harness import Settings, sync


def _sizes(s: Settings) -> dict:
    if s.n_train <= 256:
        return {"dim": 16, "width": 64, "blocks": 2, "batch": 32, "single": 4, "encoder": "resnet8", "images": 64}
    if s.device == "cpu":
        return {"dim": 64, "width": 256, "blocks": 4, "batch": 256, "single": 8, "encoder": "resnet18",
                "images": 512}
    return {"dim": 768, "width": 1536, "blocks": 12, "batch": 1024, "single": 4, "encoder": "resnet18",
            "images": 8192}


def _score_fn(z: dict, device: str) -> tuple[Callable, torch.Tensor]:
    torch.manual_seed(0)
    net = ScoreMLP(z["dim"], z["width"], z["width"], z["blocks"], 256 if z["dim"] >= 768 else 64)
    for module in (net.out[2], *(b.out_layers[3] for b in net.res_blocks)):
        torch.nn.init.normal_(module.weight, std=0.02)
    net = net.to(device).eval()
    sde = VPSDE()
    x = torch.randn(z["batch"], z["dim"], device=device)

    def score(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sde.score(net(v, sde.time_input(t)), t)

    return score, x


def cases(s: Settings) -> list:
    z = _sizes(s)
    score, x = _score_fn(z, s.device)
    sde = VPSDE()

    def timed(fn: Callable[[], None], samples: int) -> float:
        sync(s.device)
        start = time.perf_counter()
        fn()
        sync(s.device)
        return (time.perf_counter() - start) / samples

    def one_at_a_time() -> float:
        rows = x[: z["single"]]
        return timed(lambda: [pf_ode_likelihood(score, sde, rows[i : i + 1], index=torch.tensor([i]))
                              for i in range(len(rows))], len(rows))

    def batched() -> float:
        return timed(lambda: pf_ode_likelihood(score, sde, x, index=torch.arange(len(x))), len(x))

    images = load_digits_uint8()[0]
    images = images.repeat((z["images"] + len(images) - 1) // len(images), 1, 1, 1)[: z["images"]]
    encoder, _ = build_encoder(EncoderSpec("bench", backbone=z["encoder"]), 100)
    accel = "gpu" if s.device.startswith("cuda") else "cpu"

    def make_trainer(**kwargs):
        return L.Trainer(accelerator=accel, devices=1, precision=s.precision, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, **kwargs)

    def embedding() -> float:
        return timed(lambda: embed(encoder, images, torch.zeros(len(images), dtype=torch.long),
                                   torch.arange(len(images)), make_trainer=make_trainer,
                                   batch_size=min(256, len(images))),
                     len(images))

    return [
        (f"PF-ODE likelihood, one sample per solve (d {z['dim']}, width {z['width']}) (baseline)", one_at_a_time, 1),
        (f"PF-ODE likelihood, {z['batch']} samples per solve", batched, 1),
        (f"embedding, {z['encoder']} in predict mode ({s.precision}), per image", embedding, 1),
    ]
