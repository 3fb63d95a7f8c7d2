"""What the demo pages are made of: the demos, their run records and times from scripts/demos/run_demos.sh, the
tables ``lightning-methods table`` wrote (table.csv, baseline.csv), and the small formats the pages share."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from lightning_methods.results import find_records, group_runs
from lightning_methods.results.aggregate import run_seed

DEMOS = (
    (
        "quickstart",
        "Quickstart",
        "`configs/quickstart.yaml` (ResNet-8, 12 epochs; test accuracy of the best checkpoint)",
    ),
    (
        "multibit",
        "EMQ and LSQ vs Any-Precision",
        "`configs/quantization/digits_emq.yaml` (bit-wise coresets, prune rate 0.5), "
        "`digits_anyprecision.yaml` (the same without coresets) and `digits_lsq.yaml` (that with LSQ's learned step "
        "sizes instead of the DoReFa quantizers); test accuracy per bit-width (3 bits never trained)",
    ),
    (
        "hpn",
        "HPN multi-task sweep",
        "`configs/hpn/digits_multitask.yaml` over the task weight t (digit accuracy %, ink MAE in lit pixels)",
    ),
    (
        "early_cutting",
        "Early Cutting vs plain CE",
        "`lightning-methods select --config "
        "configs/noisy_labels/digits_sym40.yaml` (rows `seed*`, metric `test_acc_last`) against "
        "`configs/noisy_labels/digits_sym40_ce.yaml` (`test/acc`), 40% symmetric label noise, clean test set",
    ),
    ("tunnel", "Tunnel Effect", "`configs/tunnel/digits_mlp.yaml` (MLP depth 10 / width 128, 30 epochs, TunnelProbe)"),
    ("ood", "EncMin2L OOD", "`lightning-methods ood --config configs/ood/digits_demo.yaml` (AUROC x 100)"),
    (
        "fedfree",
        "FedFree",
        "`lightning-methods fed --config configs/federated/digits_demo.yaml` (final-round client accuracy)",
    ),
    (
        "fedfree_skew",
        "FedFree under label skew",
        "`lightning-methods fed --config configs/federated/digits_demo.yaml --data.partition.classes_per_client 2` "
        "(the paper's non-IID1 regime: 2 of the 10 classes per client; final-round client accuracy)",
    ),
    (
        "sam",
        "SAM, SAM-ON and ASAM-ON vs SGD",
        "`configs/sam/digits_sgd.yaml` (ResNet-8, 12 epochs, SGD with label smoothing 0.1) and `digits_sam.yaml` "
        "(rho 0.05, every parameter), `digits_samon.yaml` (rho 0.5, normalization layers only), `digits_asamon.yaml` "
        "(elementwise adaptive, rho 1.0, normalization layers only), the same SGD inside; test accuracy after the last "
        "epoch, each variant against SGD seed by seed",
    ),
    (
        "sam_long",
        "SGD, SAM and SAM-ON in 30 epochs",
        "The SAM demo's `digits_sgd`, `digits_sam` and `digits_samon` again with 30 epochs "
        "(`-- --trainer.max_epochs 30 --model.init_args.lr_scheduler.init_args.T_max 30`), nothing else changed",
    ),
    (
        "koala",
        "KOALA-M and KOALA++ vs SGD and Adam",
        "`configs/koala/digits_{sgd,adam,koalam,koalapp}.yaml` (ResNet-8, 12 epochs, x0.2 at epochs 4 / 7 / 11; the "
        "CIFAR-100 files' optimizer settings); test accuracy after the last epoch, each optimizer against SGD seed by "
        "seed",
    ),
    (
        "distillation",
        "KD, DKD and DeepKD vs the student alone",
        "`configs/distillation/digits_teacher.yaml` (ResNet-20, seed 0) distilled into an MLP with two hidden layers "
        "of 16 units: `digits_student.yaml` (no teacher), `digits_kd.yaml`, `digits_dkd.yaml`, "
        "`digits_kd_deepkd.yaml` (KD + DeepKD) and `digits_deepkd.yaml` (DKD + DeepKD), 16 epochs, one split (data "
        "seed 0, the teacher's); the seed sets the student's initialisation and batch order; test accuracy after the "
        "last epoch, each method against the student alone seed by seed",
    ),
)


def records(folder: Path) -> list[dict]:
    """The fit records (results.json) and select summaries (summary.json) under ``folder``."""
    out = []
    for path in sorted(folder.rglob("results.json")):
        data = json.loads(path.read_text())
        if data.get("command") == "fit":
            out.append(data)
    for path in sorted(folder.rglob("summary.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "test_acc_last" in data:
            data["_path"] = str(path)
            out.append(data)
    return out


def times(root: Path) -> list[dict]:
    path = root / "times.tsv"
    return list(csv.DictReader(path.open(), delimiter="\t")) if path.is_file() else []


def demo_times(rows: list[dict], name: str, threads: str = "1") -> list[dict]:
    """The times.tsv rows of demo ``name`` (its label, or ``<name>_<part>`` such as ``early_cutting_ce``, unless a
    longer demo name owns the label: ``fedfree_skew`` is not part of ``fedfree``) run with ``threads`` threads."""

    def owner(label: str) -> str | None:
        names = [d[0] for d in DEMOS if label == d[0] or label.startswith(d[0] + "_")]
        return max(names, key=len) if names else None

    return [r for r in rows if owner(r["demo"]) == name and r["threads"] == threads]


def seeds_text(base: Path) -> str:
    """The seeds of the demo runs under ``base`` (``0, 1, 2, 3, 4``)."""
    try:
        seeds = {run_seed(r) for r in find_records([base])}
    except FileNotFoundError:
        return "(none yet)"
    return ", ".join(str(x) for x in sorted(x for x in seeds if isinstance(x, int)))


def rows_by_name(folder: Path) -> dict[str, object]:
    try:
        return {row.name: row for row in group_runs(find_records([folder]))}
    except FileNotFoundError:
        return {}


def csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [
        {k.lower() if k in ("Config", "Setting") else k: v for k, v in row.items()}
        for row in csv.DictReader(path.open(encoding="utf-8-sig"))
    ]


def pm(row: dict, metric: str, digits: int = 1) -> str:
    mean, std = row.get(f"{metric} mean"), row.get(f"{metric} std")
    if not mean:
        return "n/a"
    return f"{float(mean):.{digits}f} ± {float(std or 0):.{digits}f}"


def table_row(folder: Path, name: str) -> dict:
    return next((r for r in csv_rows(folder / "table.csv") if f"{r['config']} {r['setting']}".strip() == name), {})


def span(values: list[float], digits: int = 0) -> str:
    """``min-max`` of ``values`` (one number when they round alike)."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def baseline_rows(folder: Path) -> list[dict]:
    path = folder / "baseline.csv"
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.is_file() else []


def label(row: dict) -> str:
    return row["metric"] if row["metric"] == row["baseline_metric"] else f"{row['metric']} vs {row['baseline_metric']}"


def apart_text(row: dict) -> str:
    """``every run above`` (``above in every seed`` for a ``--paired`` comparison) from a baseline.csv row that is
    apart."""
    side = "above" if row["apart"] == "1" else "below"
    return f"{side} in every seed" if row.get("paired") == "1" else f"every run {side}"


def verdict(row: dict) -> str:
    """``+21.71, every run above (chance 0.0079)`` or ``-2.05, within the seed spread`` from a baseline.csv row."""
    if row["apart"] == "0":
        return f"{float(row['diff']):+.2f}, within the seed spread"
    return f"{float(row['diff']):+.2f}, {apart_text(row)}, chance {float(row['chance']):.2g}"


def time_line(recs: list[dict], timed: list[dict]) -> str:
    """``Time: ...`` from the fit runs' wall times and the demo's rows of times.tsv ("" when there is neither)."""
    parts = []
    walls = [r["wall_time_s"] for r in recs if r.get("wall_time_s")]
    if walls:
        parts.append(f"{len(walls)} fit runs, wall time per run {span(walls)} s")
    if timed:
        wall = sum(float(r["wall_s"]) for r in timed)
        cpu = sum(float(r["cpu_s"]) for r in timed)
        loads = [float(r[k]) for r in timed for k in ("load1_before", "load1_after") if r.get(k)]
        load = span(loads, 1) if loads else "not recorded"
        parts.append(f"the commands {wall:.0f} s of wall time summed, {cpu:.0f} s of CPU time (one thread per run), "
                     f"1-minute load average {load} on {os.cpu_count()} logical CPUs")
    return f"Time: {'; '.join(parts)}." if parts else ""


def versions_of(folder: Path) -> str:
    for record in records(folder):
        v = record.get("versions") or {}
        if v:
            return f"torch {v.get('torch')}, Python {v.get('python')}"
    return folder.name
