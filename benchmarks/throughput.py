"""Training throughput of lightning-methods, as ratios against baselines measured in the same run.

    python benchmarks/throughput.py                 # full mode: GPU if present (ResNet-18, batch 512, bf16)
    python benchmarks/throughput.py --mode small    # tiny CPU mode, seconds (used by the smoke test)
    python benchmarks/throughput.py --sections optimizers,distillation --out table.md

Sections (each with its own baseline, ratio = time per step / baseline time per step; images/s = batch / time):
- loop:      raw PyTorch loop vs ImageClassifier + Trainer (same model, on-device augmentation, precision, data)
- input:     DataLoader workers (batched and, as "before", per-sample indexing) vs gpu_resident input,
             on a small CIFAR network where the input pipeline matters
- precision: fp32 vs bf16-mixed; channels_last off/on; torch.compile off/on (full mode, or --compile)
- optimizers:   per-step cost of every optimizer against plain SGD on the same model
- distillation: KD / DKD / DeepKD (teacher forward included) against the student trained with CE alone
             (the method cases live in benchmarks/method_cases.py)
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
    full_settings,
    machine,
    median_time,
    small_settings,
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


SECTIONS = ("loop", "input", "precision", "optimizers", "distillation")


def run(mode: str = "full", sections: tuple[str, ...] = SECTIONS,
        with_compile: bool | None = None, verbose: bool = True) -> list[Row]:
    """Measure the requested sections; returns one row per case with seconds/step, images/s and ratio."""
    s = small_settings() if mode == "small" else full_settings()
    with_compile = (mode == "full") if with_compile is None else with_compile
    from method_cases import distillation_cases, optimizer_cases

    builders = {"loop": lambda: loop_section(s), "input": lambda: input_section(s),
                "precision": lambda: precision_section(s, with_compile), "optimizers": lambda: optimizer_cases(s),
                "distillation": lambda: distillation_cases(s)}
    rows: list[Row] = []
    for section in sections:
        baseline = None
        cases = builders[section]()
        cases[0][1]()  # discarded warm-up run: one-time costs (allocator, kernels, thread pools) stay out of the table
        for name, fn in cases:
            sec = median_time(fn, s.repeats)
            baseline = baseline or sec
            row = {"section": section, "case": name, "ms_per_step": 1e3 * sec,
                   "img_per_s": s.batch_size / sec, "ratio": sec / baseline}
            rows.append(row)
            if verbose:
                print(f"{section:12s} {name:52s} {row['ms_per_step']:9.2f} ms {row['img_per_s']:10.0f} img/s "
                      f"x{row['ratio']:.3f}", flush=True)
    return rows


def markdown(rows: list[Row], mode: str) -> str:
    s = small_settings() if mode == "small" else full_settings()
    lines = [f"Machine: {machine()}. Software: {versions()}.",
             f"Mode {mode}: backbone {s.backbone} (input section: {s.small_backbone}), batch {s.batch_size}, "
             f"precision {s.precision} unless named, {s.steps} timed steps after {s.warmup} warm-up, median of "
             f"{s.repeats}. Ratio = time per step / the section's baseline (first row).", "",
             "| section | case | ms / step | images / s | ratio |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['section']} | {r['case']} | {r['ms_per_step']:.2f} | {r['img_per_s']:.0f} | {r['ratio']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["small", "full"], default="full")
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
