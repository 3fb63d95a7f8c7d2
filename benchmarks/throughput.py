"""Training throughput of lightning-methods, as ratios against baselines measured in the same run.

    python benchmarks/throughput.py                 # full mode: GPU if present (ResNet-18, batch 512, bf16)
    python benchmarks/throughput.py --mode cpu      # no GPU: CIFAR ResNets at batch 128 (a few minutes)
    python benchmarks/throughput.py --mode small    # tiny CPU mode, seconds (used by the smoke test)
    python benchmarks/throughput.py --sections optimizers,distillation --out table.md

Sections (each with its own baseline, ratio = time per step / baseline time per step; images/s = batch / time):
- loop:      raw PyTorch loop vs ImageClassifier + Trainer (same model, on-device augmentation, precision, data)
- pipeline:  the input pipeline alone (no model), batch 256: the torchvision per-sample PIL recipe vs uint8
             per-sample indexing ("before") vs batched __getitems__ indexing vs gpu_resident slicing, each followed
             by the package's batched crop / flip / normalize on the device
- input:     DataLoader workers (batched and, as "before", per-sample indexing) vs gpu_resident input while training
             a small CIFAR network
- precision: fp32 vs bf16-mixed; channels_last off/on; torch.compile off/on (full mode, or --compile)
- optimizers:   per-step cost of every optimizer against plain SGD on the same model
- distillation: KD / DKD / DeepKD (teacher forward included) against the student trained with CE alone
             (the method cases live in benchmarks/method_cases.py)
- family sections (one file each, ``benchmarks/<section>_cases.py`` with ``cases(s: Settings) -> list[Case]``):
  multibit, federated, ood, vit_locality, tunnel, hpn. A case is ``(name, fn)`` or ``(name, fn, items)``:
  ``fn()`` returns seconds per timed unit (a step unless the name says otherwise, e.g. "per epoch", "per round"),
  ``items`` is the number of samples one unit processes (default: the batch size), for the images/s column.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import (  # noqa: E402
    Settings,
    classifier,
    data,
    machine,
    median_time,
    settings,
    time_input,
    time_raw_loop,
    time_trainer,
    versions,
)

Row = dict[str, object]


def loop_section(s: Settings) -> list[tuple[str, Callable[[], float]]]:
    return [
        ("raw PyTorch loop (baseline)", lambda: time_raw_loop(s, s.backbone, data(s, gpu_resident=True))),
        ("ImageClassifier + Trainer", lambda: time_trainer(s, classifier(s.backbone), data(s, gpu_resident=True))),
        ("ImageClassifier + Trainer, progress bar", lambda: time_trainer(
            s, classifier(s.backbone), data(s, gpu_resident=True), enable_progress_bar=True)),
    ]


def pipeline_section(s: Settings) -> list[tuple[str, Callable[[], float]]]:
    w = f"{s.workers} worker{'s' if s.workers != 1 else ''}"
    return [
        (f"torchvision PIL recipe, per sample, {w} (baseline)", lambda: time_input(s, "pil")),
        (f"uint8 per-sample indexing + device aug, {w} (before)", lambda: time_input(s, "per_sample")),
        (f"uint8 batched indexing + device aug, {w}", lambda: time_input(s, "batched")),
        ("uint8 per-sample indexing + device aug, in-process (before)", lambda: time_input(s, "per_sample", 0)),
        ("uint8 batched indexing + device aug, in-process", lambda: time_input(s, "batched", 0)),
        ("gpu_resident slicing + device aug", lambda: time_input(s, "resident")),
    ]


def input_section(s: Settings) -> list[tuple[str, Callable[[], float]]]:
    b = s.small_backbone
    return [
        (f"{s.workers} workers, batched indexing (baseline)", lambda: time_trainer(s, classifier(b), data(s))),
        (f"{s.workers} workers, per-sample indexing (before)",
         lambda: time_trainer(s, classifier(b), data(s, per_sample_indexing=True))),
        ("gpu_resident", lambda: time_trainer(s, classifier(b), data(s, gpu_resident=True))),
    ]


def precision_section(s: Settings, with_compile: bool) -> list[tuple[str, Callable[[], float]]]:
    cases = [
        ("fp32, contiguous (baseline)", lambda: time_trainer(
            s, classifier(s.backbone), data(s, gpu_resident=True), precision="32-true")),
        ("bf16-mixed", lambda: time_trainer(
            s, classifier(s.backbone), data(s, gpu_resident=True), precision="bf16-mixed")),
        ("bf16-mixed + channels_last", lambda: time_trainer(
            s, classifier(s.backbone, channels_last=True), data(s, gpu_resident=True), precision="bf16-mixed")),
    ]
    if with_compile:
        cases.append(("bf16-mixed + channels_last + compile", lambda: time_trainer(
            s, classifier(s.backbone, channels_last=True, compile=True), data(s, gpu_resident=True),
            precision="bf16-mixed")))
    return cases


CORE_SECTIONS = ("loop", "pipeline", "input", "precision", "optimizers", "distillation")
FAMILY_SECTIONS = ("multibit", "federated", "ood", "vit_locality", "tunnel", "hpn")
SECTIONS = CORE_SECTIONS + tuple(f for f in FAMILY_SECTIONS if (Path(__file__).parent / f"{f}_cases.py").is_file())


def family_cases(section: str, s: Settings) -> list:
    """The cases of a family section, from ``benchmarks/<section>_cases.py``."""
    import importlib

    return importlib.import_module(f"{section}_cases").cases(s)


def run(mode: str = "full", sections: tuple[str, ...] = SECTIONS,
        with_compile: bool | None = None, verbose: bool = True) -> list[Row]:
    """Measure the requested sections; returns one row per case with seconds/step, images/s and ratio."""
    s = settings(mode)
    with_compile = (mode == "full") if with_compile is None else with_compile
    from method_cases import distillation_cases, optimizer_cases

    builders = {"loop": lambda: loop_section(s), "pipeline": lambda: pipeline_section(s),
                "input": lambda: input_section(s),
                "precision": lambda: precision_section(s, with_compile), "optimizers": lambda: optimizer_cases(s),
                "distillation": lambda: distillation_cases(s)}
    builders.update({f: (lambda f=f: family_cases(f, s)) for f in FAMILY_SECTIONS})
    rows: list[Row] = []
    for section in sections:
        baseline = None
        cases = builders[section]()
        cases[0][1]()  # discarded warm-up run: one-time costs (allocator, kernels, thread pools) stay out of the table
        for name, fn, *items in cases:
            sec = median_time(fn, s.repeats)
            baseline = baseline or sec
            batch = items[0] if items else (256 if section == "pipeline" else s.batch_size)
            row = {"section": section, "case": name, "ms_per_step": 1e3 * sec,
                   "img_per_s": batch / sec, "ratio": sec / baseline}
            rows.append(row)
            if verbose:
                print(f"{section:12s} {name:52s} {row['ms_per_step']:9.2f} ms {row['img_per_s']:10.0f} img/s "
                      f"x{row['ratio']:.3f}", flush=True)
    return rows


def markdown(rows: list[Row], mode: str) -> str:
    s = settings(mode)
    lines = [f"Machine: {machine()}. Software: {versions()}.",
             f"Mode {mode}: backbone {s.backbone} (input section: {s.small_backbone}), batch {s.batch_size}, "
             f"precision {s.precision} unless named, {s.steps} timed steps after {s.warmup} warm-up (pipeline section: "
             f"batch 256, no model, {3 * s.steps} batches), median of {s.repeats}. "
             "Ratio = time per step / the section's baseline (first row).", "",
             "| section | case | ms / step | images / s | ratio |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['section']} | {r['case']} | {r['ms_per_step']:.2f} | {r['img_per_s']:.0f} | {r['ratio']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["small", "cpu", "full"], default="full")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--compile", dest="with_compile", action="store_true", default=None,
                        help="include the torch.compile case (default: full mode only)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    print(f"# {machine()} | {versions()}", flush=True)
    rows = run(args.mode, tuple(args.sections.split(",")), args.with_compile)
    table = markdown(rows, args.mode)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
