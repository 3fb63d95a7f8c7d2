"""Training throughput of lightning-methods, as ratios against baselines measured in the same run.

    python benchmarks/throughput.py --gpu           # the GPU section (bf16, compile, ...), sized for < 5 min
    python benchmarks/throughput.py                 # full mode: GPU if present (ResNet-18, batch 512, bf16)
    python benchmarks/throughput.py --mode cpu      # no GPU: CIFAR ResNets at batch 128
    python benchmarks/throughput.py --mode quick --sections loop,optimizers,distillation --rounds 3 \\
        --json benchmarks/results/cpu_quick.json --write-docs docs/benchmarks.md   # a record of docs/benchmarks.md
    python benchmarks/throughput.py --mode small    # tiny CPU mode, seconds (used by the smoke test)

The cases of a section run interleaved, round by round in rotating order (``--rounds``, default: the mode's
``repeats``); each row reports the median of the per-round ratios to the section's baseline, the 25th-75th
percentile range and the number of rounds. On the CPU the script sets ``OMP_WAIT_POLICY=PASSIVE`` before torch is
imported (unless set already): with few cores under other load, OpenMP's default active waiting made single steps
10-25x slower in some rounds. ``--json`` saves rows and environment; ``--write-docs`` writes docs/benchmarks.md from
every JSON file in ``benchmarks/results/`` (the doc is generated, never edited by hand).

Sections (each with its own baseline, ratio = time per step / baseline time per step; images/s = batch / time):
- loop:      raw PyTorch loop vs ImageClassifier + Trainer (same model, on-device augmentation, precision, data)
- pipeline:  the input pipeline alone (no model), batch 256: the torchvision per-sample PIL recipe vs uint8
             per-sample indexing ("before") vs batched __getitems__ indexing vs gpu_resident slicing, each followed
             by the package's batched crop / flip / normalize on the device
- input:     DataLoader workers (batched and, as "before", per-sample indexing) vs gpu_resident input while training
             a small CIFAR network
- precision: fp32 vs bf16-mixed; channels_last off/on; torch.compile off/on (full mode, or --compile)
- imports:   `python -c "import X"` in fresh interpreters: lightning_methods.optim and lightning vs torch
- gpu_methods: SAM in a raw loop vs the official-style two-step SAM loop; DeepKD batched vs sequential streams
- optimizers:   per-step cost of every optimizer against plain SGD on the same model
- distillation: KD / DKD / DeepKD (teacher forward included) against the student trained with CE alone
             (the method cases live in benchmarks/method_cases.py)
- family sections (one file each, ``benchmarks/<section>_cases.py`` with ``cases(s: Settings) -> list[Case]``):
  quantization, federated, ood, vit_locality, tunnel, hpn, imagenet. A case is ``(name, fn)`` or ``(name, fn, items)``:
  ``fn()`` returns seconds per timed unit (a step unless the name says otherwise, e.g. "per epoch", "per round"),
  ``items`` is the number of samples one unit processes (default: the batch size), for the images/s column (0: the
  unit processes no images, e.g. a federated server step; the column shows "-").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path


def _cpu_mode(argv: list[str]) -> bool:
    """Whether the command line asks for a CPU mode (decided before torch is imported)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--mode=") else (argv[i + 1] if arg == "--mode" and
                                                                          i + 1 < len(argv) else None)
        if value is not None:
            return value in ("small", "quick", "cpu")
    return False


if __name__ == "__main__" and _cpu_mode(sys.argv[1:]):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch's OpenMP runtime loads

sys.path.insert(0, str(Path(__file__).parent))

from harness import (  # noqa: E402
    Settings,
    classifier,
    data,
    environment,
    interleave,
    machine,
    ratio_stats,
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


def import_cases(s: Settings) -> list[tuple]:
    """Import time in a fresh interpreter (``python -c "import X"``, wall clock, interpreter start included): the
    package's optimizers and lightning against torch (what ``from lightning_methods.optim import SAMON`` costs)."""
    import subprocess
    import time

    def fresh(statement: str) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True, env={**os.environ})
            return time.perf_counter() - t0
        return run

    return [("python -c 'import torch' (baseline)", fresh("import torch"), 1),
            ("python -c 'import lightning'", fresh("import lightning"), 1),
            ("python -c 'import lightning_methods.optim'", fresh("import lightning_methods.optim"), 1),
            ("python -c 'from lightning_methods.optim import SAMON'",
             fresh("from lightning_methods.optim import SAMON"), 1)]


CORE_SECTIONS = ("loop", "pipeline", "input", "precision", "optimizers", "distillation", "imports")
FAMILY_SECTIONS = ("quantization", "federated", "ood", "vit_locality", "tunnel", "hpn", "imagenet")
SECTIONS = CORE_SECTIONS + tuple(f for f in FAMILY_SECTIONS if (Path(__file__).parent / f"{f}_cases.py").is_file())
GPU_SECTIONS = ("loop", "input", "precision", "gpu_methods")
RESULTS = Path(__file__).parent / "results"


def family_cases(section: str, s: Settings) -> list:
    """The cases of a family section, from ``benchmarks/<section>_cases.py``."""
    import importlib

    return importlib.import_module(f"{section}_cases").cases(s)


def run(mode: str = "full", sections: tuple[str, ...] = SECTIONS, with_compile: bool | None = None,
        verbose: bool = True, rounds: int | None = None) -> list[Row]:
    """Measure the requested sections, each interleaved over ``rounds`` rounds (default: the mode's repeats);
    returns one row per case with the median per-round ratio, its 25th-75th percentiles, ms per unit and images/s."""
    s = settings(mode)
    rounds = rounds or s.repeats
    with_compile = (mode in ("full", "gpu")) if with_compile is None else with_compile
    from method_cases import distillation_cases, gpu_method_cases, optimizer_cases

    builders = {"loop": lambda: loop_section(s), "pipeline": lambda: pipeline_section(s),
                "input": lambda: input_section(s),
                "precision": lambda: precision_section(s, with_compile), "optimizers": lambda: optimizer_cases(s),
                "distillation": lambda: distillation_cases(s), "imports": lambda: import_cases(s),
                "gpu_methods": lambda: gpu_method_cases(s)}
    builders.update({f: (lambda f=f: family_cases(f, s)) for f in FAMILY_SECTIONS})
    rows: list[Row] = []
    for section in sections:
        cases = builders[section]()
        # small: a smoke test; gpu: every call already runs untimed warm-up steps (compilation included), and the
        # section must stay within its time budget
        times = interleave([c[1] for c in cases], rounds, warmup=mode not in ("small", "gpu"))
        for (name, _fn, *items), t in zip(cases, times):
            stats = ratio_stats(t, times[0])
            batch = items[0] if items else (256 if section == "pipeline" else s.batch_size)
            row = {"section": section, "case": name, "ms_per_step": 1e3 * stats["seconds"],
                   "img_per_s": batch / stats["seconds"] if batch else None,
                   **{k: stats[k] for k in ("ratio", "ratio_p25", "ratio_p75", "rounds")}}
            rows.append(row)
            if verbose:
                print(f"{section:12s} {name:52s} {row['ms_per_step']:9.2f} ms {row['img_per_s'] or 0:10.0f} img/s "
                      f"x{row['ratio']:.3f} [{row['ratio_p25']:.3f}-{row['ratio_p75']:.3f}] n={row['rounds']}",
                      flush=True)
    return rows


def record(rows: list[Row], mode: str, env: dict | None = None) -> dict:
    """The JSON record of a run: rows, the mode's settings and the environment (before and after the run)."""
    from dataclasses import asdict

    return {"mode": mode, "settings": asdict(settings(mode)), "environment": env or environment(),
            "environment_after": environment(), "rows": rows}


def _env_line(env: dict) -> str:
    v = env["versions"]
    load = env.get("load_average")
    return (f"{env['device'] if env['device'] != 'cpu' else 'CPU only'}: {env['cpu']}, {env['logical_cores']} logical "
            f"cores, {env['torch_threads']} torch threads, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; "
            + ", ".join(f"{k} {val}" for k, val in v.items())
            + (f"; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)" if load else "")
            + f"; {env['date']}")


def markdown(rows: list[Row], mode: str, env: dict | None = None, env_after: dict | None = None) -> str:
    """A table per run: one row per case with the median per-round ratio, its 25th-75th percentile range and the
    number of rounds; the environment line says what it was measured with."""
    s = settings(mode)
    env = env or environment()
    lines = [f"Measured with: {_env_line(env)}."]
    if env_after and env_after.get("load_average"):
        lines.append(f"Load average after the run: {' / '.join(f'{x:.1f}' for x in env_after['load_average'])}.")
    lines += [f"Mode `{mode}`: backbone {s.backbone} (input section: {s.small_backbone}), batch {s.batch_size}, "
              f"precision {s.precision} unless named, {s.steps} timed steps after {s.warmup} warm-up per call "
              "(pipeline section: batch 256, no model). Ratio = time per unit / the section's baseline (first row) "
              "in the same round; median over the rounds, with the 25th-75th percentile range.", "",
              "| section | case | ratio (median) | 25th-75th pct | rounds | ms / unit | images / s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['section']} | {r['case']} | {r['ratio']:.3f} | {r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} | "
              f"{r['rounds']} | {r['ms_per_step']:.2f} | "
              + (f"{r['img_per_s']:.0f} |" if r.get("img_per_s") is not None else "- |") for r in rows]
    return "\n".join(lines) + "\n"


DOC_HEAD = """# Benchmarks

<!-- Generated by `python benchmarks/throughput.py --write-docs docs/benchmarks.md` from the JSON records in
benchmarks/results/. Do not edit by hand: rerun the benchmark and regenerate. -->

Every figure is from `benchmarks/throughput.py` (machinery in `benchmarks/harness.py`, cases in
`benchmarks/*_cases.py`). The cases of a section run **interleaved**: round by round, in an order that rotates each
round, and each case's time is divided by the section baseline's time **of the same round**. A row gives the median
of these per-round ratios, their 25th-75th percentile range and the number of rounds; load on a shared machine that
slows a whole round cancels in the ratio, and the range shows what did not cancel. Read two ratios whose ranges
overlap as equal. Claims about speed elsewhere in the docs point to a row here as `docs/benchmarks.md`,
section / case.

**GPU: not measured.** No GPU was available when these records were made; every table below ran on a CPU. The GPU
section is one command (bf16, `torch.compile`, gpu_resident vs DataLoader workers, Lightning vs the raw loop, SAM vs
the official-style SAM step, DeepKD batched vs sequential streams), sized for under 5 minutes on one GPU (3 rounds of
30 timed steps per case, ResNet-18 at batch 512) but not yet run on one:

```bash
python benchmarks/throughput.py --gpu --json benchmarks/results/gpu.json --write-docs docs/benchmarks.md
```

`bash benchmarks/gpu_check.sh` runs it (2 rounds) after the other GPU-only checks (`pytest -m gpu`, the ImageNet
pipeline's GPU section, real runs through nvJPEG), each under a time limit within a budget of 5 minutes for all; the
record is rewritten after each section, and one cut short says so on this page.

Regenerate the CPU records below, then this page:

```bash
python benchmarks/throughput.py --mode quick --sections loop,optimizers,distillation --rounds 7 \\
    --json benchmarks/results/cpu_quick.json
python benchmarks/throughput.py --mode quick --sections imports --rounds 5 \\
    --json benchmarks/results/cpu_quick_imports.json
python benchmarks/throughput.py --mode quick --sections pipeline,input --rounds 5 \\
    --json benchmarks/results/cpu_quick_input.json
python benchmarks/throughput.py --mode quick --sections precision --rounds 3 \\
    --json benchmarks/results/cpu_quick_precision.json
python benchmarks/throughput.py --mode quick --sections imagenet --rounds 5 \\
    --json benchmarks/results/cpu_quick_imagenet.json
for s in quantization federated ood vit_locality tunnel hpn; do   # one record per family section
    python benchmarks/throughput.py --mode quick --sections $s --rounds 3 --json benchmarks/results/cpu_quick_$s.json
done
python benchmarks/throughput.py --write-docs docs/benchmarks.md
```

The `imagenet` section's cases return CPU-seconds (the main process and its reaped DataLoader workers) per batch,
so its ratios are per core and hold on a shared machine: 0.5 means twice the images per CPU-second of the
`ImageFolder` + PIL baseline. One epoch of 2,048 photographs per case and round (quick / cpu modes), one worker per
loader, started afresh each epoch as a streaming loader's are. The other sections time wall-clock seconds.
"""


def write_docs(path: str | Path, results: Path = RESULTS) -> str:
    """Write the benchmarks doc from every JSON record in ``results`` (sorted by name); returns the text."""
    parts = [DOC_HEAD]
    files = sorted(results.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no benchmark records (*.json) in {results}; run throughput.py with --json first")
    loaded = [(f, json.loads(f.read_text())) for f in files]
    records = [(f, rec) for f, rec in loaded if isinstance(rec, dict) and {"rows", "environment", "mode"} <= set(rec)]
    others = [f.name for f, rec in loaded if (f, rec) not in records]
    recorded = {r["section"] for _f, rec in records for r in rec["rows"]}
    missing = [x for x in SECTIONS if x not in recorded]
    if missing:
        parts.append("Sections without a table here yet: "
                     + ", ".join(f"`{x}`" for x in missing) + ". Add one with `python benchmarks/throughput.py "
                     "--mode cpu --sections NAME --json benchmarks/results/NAME.json --write-docs docs/benchmarks.md`."
                     "\n")
    if others:
        parts.append("Other files in `benchmarks/results/` (written by their own scripts, not tables of this harness): "
                     + ", ".join(f"`{n}`" for n in others) + ".\n")
    for f, rec in records:
        env = rec["environment"]
        load = env.get("load_average")
        parts.append(f"## {f.stem} (mode `{rec['mode']}`)\n")
        if load and env.get("logical_cores") and load[0] > env["logical_cores"]:
            parts.append(f"Measured **under load**: the machine was shared with other jobs (load average "
                         f"{load[0]:.1f} on {env['logical_cores']} logical cores at the start). The ratios come from "
                         "interleaved rounds and are usable; the absolute ms and images/s are slower than on an idle "
                         "machine.\n")
        if rec.get("complete") is False:
            parts.append(f"**Cut short**: only the sections {', '.join(rec.get('sections_measured', []))} were "
                         "measured before the run stopped (a time limit); rerun the others.\n")
        parts.append(markdown(rec["rows"], rec["mode"], env, rec.get("environment_after")))
    text = "\n".join(parts)
    Path(path).write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["small", "quick", "cpu", "full", "gpu"], default="full")
    parser.add_argument("--gpu", action="store_true", help="the GPU section: --mode gpu --sections "
                        + ",".join(GPU_SECTIONS) + " --compile (sized for under 5 minutes on one GPU)")
    parser.add_argument("--sections", default=None, help=f"comma-separated, from {','.join(SECTIONS)},gpu_methods")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: the mode's repeats)")
    parser.add_argument("--compile", dest="with_compile", action="store_true", default=None,
                        help="include the torch.compile case (default: full and gpu modes)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--json", help="save rows and environment to this JSON file (e.g. benchmarks/results/x.json)")
    parser.add_argument("--write-docs", metavar="DOC", help="write DOC (docs/benchmarks.md) from benchmarks/results/")
    args = parser.parse_args(argv)
    if args.gpu:
        args.mode, args.sections = "gpu", args.sections or ",".join(GPU_SECTIONS)
    import torch

    if args.mode in ("full", "gpu") and not torch.cuda.is_available() and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # CPU after all: restart so OpenMP reads it at load time
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.sections is None and args.write_docs and not args.json:
        write_docs(args.write_docs)
        return
    env = environment()
    print(f"# {machine()} | {versions()} | OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} | "
          f"load {env.get('load_average')}", flush=True)
    rows: list[Row] = []
    sections = tuple((args.sections or ",".join(SECTIONS)).split(","))
    for done, section in enumerate(sections, 1):  # the record is rewritten after each section: a cut keeps them
        rows += run(args.mode, (section,), args.with_compile, rounds=args.rounds)
        rec = {**record(rows, args.mode, env), "sections_measured": list(sections[:done]),
               "complete": done == len(sections)}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")
    table = markdown(rows, args.mode, env, rec["environment_after"])
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.write_docs:
        write_docs(args.write_docs)


if __name__ == "__main__":
    main()
