"""Step time of the SAM family relative to the base optimizer, measured in one run on the same model and data.

SAM-ON (Mueller et al., "Normalization Layers Are All That Sharpness-Aware Minimization Needs", NeurIPS 2023,
arXiv 2306.04226) perturbs only the normalization parameters, so the ascent pass needs only their gradients:
``freeze_non_norm_pass1=True`` skips the weight-gradient GEMMs of every other layer in that pass. This script shows
what that saves (every SAM variant costs about 2x the base optimizer without it).

    python benchmarks/sam_on_ascent.py --small            # CPU-sized: ResNet-14, batch 32 (under a minute)
    python benchmarks/sam_on_ascent.py                    # WRN-28-10, batch 128, on the GPU when there is one
    python benchmarks/sam_on_ascent.py --backbone resnet56 --precision bf16 --channels-last

``measure(...)`` returns the numbers (used by the general harness ``benchmarks/throughput.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from lightning_methods.models import create_backbone
from lightning_methods.optim import ASAMON, SAM, SAMON, sam_closure
from lightning_methods.parameters import param_groups_by_role

SGD = partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4)

#: variant name -> optimizer factory (role-tagged param groups -> optimizer)
VARIANTS: dict[str, Callable] = {
    "sgd": SGD,
    "sam": lambda g: SAM(g, SGD, rho=0.05),
    "samon": lambda g: SAMON(g, SGD, rho=1.0),
    "samon_freeze": lambda g: SAMON(g, SGD, rho=1.0, freeze_non_norm_pass1=True),
    "asamon_freeze": lambda g: ASAMON(g, SGD, rho=10.0, freeze_non_norm_pass1=True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    backbone: str = "wrn_28_10",
    batch_size: int = 128,
    steps: int = 20,
    warmup: int = 5,
    rounds: int = 3,
    variants: Sequence[str] = ("sgd", "sam", "samon", "samon_freeze"),
    device: str | None = None,
    precision: str = "32",
    channels_last: bool = False,
    image_size: int = 32,
    num_classes: int = 100,
    seed: int = 0,
    cpu_time: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Median milliseconds per optimizer step for each variant and the ratio to the first variant (the base).

    Variants are timed in interleaved rounds (``rounds`` x ``steps`` steps each, after ``warmup`` steps) on one
    model copy each, so drift of the machine affects all of them alike. ``precision`` is ``"32"`` or ``"bf16"``
    (autocast). ``cpu_time`` (default: on CPU devices) measures process CPU time instead of wall time, which a busy
    shared machine distorts less (ms then counts CPU-ms of all threads). Returns ``{variant: {"ms_per_step",
    "ratio_vs_base", "images_per_s"}}``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    setups = {}
    for name in variants:
        torch.manual_seed(seed)
        model = create_backbone(backbone, num_classes).to(dev, memory_format=fmt).train()
        setups[name] = (model, VARIANTS[name](param_groups_by_role(model)))
    # CPU: process CPU time (robust on a shared machine; all intra-op threads counted); GPU: wall time after syncs
    clock = time.process_time if (cpu_time if cpu_time is not None else dev.type == "cpu") else time.perf_counter
    autocast = partial(torch.autocast, device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(name: str, n: int) -> float:
        model, opt = setups[name]

        def loss() -> torch.Tensor:
            with autocast():
                return F.cross_entropy(model(x), y)

        _sync(dev)
        start = clock()
        for _ in range(n):
            opt.step(sam_closure(model, loss))
        _sync(dev)
        return (clock() - start) / n * 1e3

    for name in variants:
        run(name, warmup)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            times[name].append(run(name, steps))
    base = statistics.median(times[variants[0]])
    out = {}
    for name in variants:
        ms = statistics.median(times[name])
        out[name] = {"ms_per_step": ms, "ratio_vs_base": ms / base, "images_per_s": batch_size / ms * 1e3}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized run: resnet14, batch 32, few steps")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--variants", nargs="+", default=["sgd", "sam", "samon", "samon_freeze"],
                        choices=sorted(VARIANTS))
    args = parser.parse_args(argv)
    small = args.small
    cfg = dict(
        backbone=args.backbone or ("resnet14" if small else "wrn_28_10"),
        batch_size=args.batch_size or (32 if small else 128),
        steps=args.steps or (3 if small else 20),
        warmup=1 if small else 5,
        rounds=args.rounds,
        variants=args.variants,
        device=args.device,
        precision=args.precision,
        channels_last=args.channels_last,
    )
    res = measure(**cfg)
    dev = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    clock = "process CPU time" if not dev.startswith("cuda") else "wall time"
    print(f"{cfg['backbone']}, batch {cfg['batch_size']}, precision {cfg['precision']}, {name}, "
          f"torch {torch.__version__}, {clock}")
    print("| variant | ms / step | x base | images / s |\n|---|---|---|---|")
    for variant, r in res.items():
        print(f"| {variant} | {r['ms_per_step']:.1f} | {r['ratio_vs_base']:.2f} | {r['images_per_s']:.0f} |")
    return res


if __name__ == "__main__":
    main()
