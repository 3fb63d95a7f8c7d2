"""Write docs/demos.md from the outputs of scripts/demos/run_demos.sh: the tables of ``lightning-methods table``
(and the multibit cost / tunnel per-layer summaries), whether each method's difference to its baseline is beyond the
seed spread (``table --baseline``'s baseline.csv; EncMin2L against each single detector run by run), where and how
the runs ran (torch version, threads, CPU, from the runs' results.json), run times with the load average, and seed 0
with one thread against two threads.

    python scripts/demos/collect.py [runs/demos] [docs/demos.md] [OTHER_DEMO_DIR ...]

Each OTHER_DEMO_DIR holds the quickstart demo run with other library versions (``DEMO_DIR=runs/demos_torch26
scripts/demos/run_demos.sh quickstart`` in another environment); the page compares it with the main runs.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from lightning_methods.results import compare, find_records, group_runs
from lightning_methods.results.aggregate import row_values, run_seed, run_value

DEMOS = (
    (
        "quickstart",
        "Quickstart",
        "`configs/quickstart.yaml` (ResNet-8, 12 epochs; test accuracy of the best checkpoint)",
    ),
    (
        "multibit",
        "EMQ vs Any-Precision",
        "`configs/quantization/digits_emq.yaml` (bit-wise coresets, prune rate 0.5) and "
        "`digits_anyprecision.yaml` (the same without coresets); test accuracy per bit-width (3 bits never trained)",
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
)
EXTRA = {"multibit": "cost.md", "tunnel": "summary.md"}
#: What each demo can and cannot show (written with the runs in front of us; the numbers above are generated).
NOTES = {
    "multibit": (
        "EMQ trains on 60% of Any-Precision's training samples here (2 full warm-up epochs, then coresets of half "
        "the data for 10 epochs) but scores the whole training set at every refresh (every 2 epochs: forward passes "
        "only), so its forward passes exceed Any-Precision's; the demo shows the coreset mechanics and the accuracy "
        "per bit-width, not a speed-up. EMQ's mean is below Any-Precision's at every bit-width; whether that is beyond "
        "the seed spread changed with the library versions (the last section), so the demo does not settle it."
    ),
    "hpn": (
        "At t = 0.01 the classification term is too weak to learn in 15 epochs (chance accuracy) while the ink MAE is "
        "lowest: against the paper's choice t = 0.25 that is the one difference beyond the seed spread here. t = 0.1, "
        "0.5 and 0.9 stay within the seed spread of t = 0.25 on both tasks (t = 0.9 has the largest mean MAE; "
        "t = 0.1's lower accuracy is beyond it with other library versions, the last section): the demo shows the "
        "trade-off at the small end, not the paper's optimum at t = 0.25."
    ),
    "early_cutting": (
        "Compare `test_acc_last` of the select runs (`seed*` rows) with `test/acc` of `digits_sym40_ce`: both are "
        "the clean test accuracy after the last epoch."
    ),
    "ood": (
        "Every detector scores the same runs (same splits, encoders and calibration digits), so EncMin2L is compared "
        "with each single detector run by run: the difference has one sign in every run, or it has not."
    ),
    "fedfree": (
        "Local-only trains each client on its own digits; FedAvg averages every layer of the shared CNN each round; "
        "FedFree exchanges only the uploaded layers, through the server's alignment on Gaussian pseudo-data. The "
        "comparison with Local-only says whether each form of sharing helps here beyond the seed spread."
    ),
    "tunnel": (
        "The probe of the output layer (`fc10`, the logits) reaches the model's own test accuracy: the linear probes "
        "are fitted to convergence (L-BFGS)."
    ),
}
VIT_NOTE = (
    "## ViT locality\n\nNo digits demo: the ViT-locality configs need CIFAR / Tiny-ImageNet and many epochs, so the "
    "paper's effect (CutMix lowers the early-layer MAD) is not measured in this project; docs/methods/vit_locality.md "
    "gives the paper's numbers only.\n"
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


def machine(root: Path) -> str:
    for name, *_ in DEMOS:
        for r in records(root / name):
            if "versions" in r and "threads" in r.get("device", {}):
                v, d = r["versions"], r["device"]
                return (
                    f"torch {v['torch']}, lightning {v['lightning']}, Python {v['python']}; CPU "
                    f'"{d.get("cpu")}" ({d["cpus"]} logical CPUs), {d["threads"]} torch thread(s) per run'
                )
    return "unknown"


def seeds_text(base: Path) -> str:
    """The seeds of the demo runs under ``base`` (``0, 1, 2, 3, 4``)."""
    try:
        seeds = {run_seed(r) for r in find_records([base])}
    except FileNotFoundError:
        return "(none yet)"
    return ", ".join(str(x) for x in sorted(x for x in seeds if isinstance(x, int)))


def other_versions_section(base: Path, others: list[Path]) -> list[str]:
    """The quickstart under other library versions against the main runs: do the numbers hold elsewhere?"""
    if not others:
        return []
    def row_and_versions(folder: Path) -> tuple[object, str] | None:
        rows = list(_rows_by_name(folder / "quickstart").values())
        if not rows:
            return None
        v = rows[0].runs[0].get("versions") or {}
        return rows[0], f"torch {v.get('torch')}, lightning {v.get('lightning')}, Python {v.get('python')}"

    main_row = row_and_versions(base)
    if main_row is None:
        return []
    lines = ["## Other library versions", "",
             "The same command and seeds in other environments on this machine (one thread each), against the runs "
             "above: do the digits hold elsewhere? Float sums depend on the kernels of each torch release, so single "
             "runs differ; the question is whether the mean moves beyond the seed spread.", "",
             "| versions | n | test/acc | against the runs above |", "|---|---|---|---|"]
    for folder in [base, *others]:
        found = row_and_versions(folder)
        if found is None:
            continue
        row, versions = found
        values = row_values(row, "test/acc")
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        if folder == base:
            verdict = "(the runs above)"
        else:
            c = compare.Comparison(row.name, "test/acc", "main", "test/acc", tuple(values),
                                   tuple(row_values(main_row[0], "test/acc")))
            verdict = f"Δ {c.diff:+.2f}, {c.verdict}"
        lines.append(f"| {versions} | {len(values)} | {mean:.2f} ± {std:.2f} | {verdict} |")
    return [*lines, "", *conclusions_section(base, [o for o in others if any(o.glob("*/baseline.csv"))])]


#: The comparisons whose verdicts are checked under other library versions (demo -> metrics of baseline.csv).
KEY_COMPARISONS = {
    "multibit": ("test/acc_bit1", "test/acc_bit2", "test/acc_bit4", "test/acc_bit8", "test/acc_bit32"),
    "hpn": ("test/acc", "test/mae"),
    "early_cutting": ("test_acc_last",),
    "fedfree": ("final_mean",),
}


def conclusions_section(base: Path, others: list[Path]) -> list[str]:
    """Each demo's verdicts against its baseline here and in the other environments that ran every demo."""
    if not others:
        return []
    head = ["demo", "comparison", _versions(base), *map(_versions, others)]
    signs: list[tuple[str, list[int | None]]] = []
    lines = ["Every demo in those environments too: does each verdict against the baseline hold?", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, title, _ in DEMOS:
        if name == "ood":
            found = [{f"{c.metric} vs {c.baseline_metric}": c for c in ood_comparisons(d / name)
                      if c.metric.endswith("/union/auroc")} for d in [base, *others]]
            for key in found[0]:
                cells = [_comparison_cell(f.get(key)) for f in found]
                label = f"{key.replace('/union/auroc', '')} (union)"
                lines.append(f"| {title} | {label} | " + " | ".join(cells) + " |")
                signs.append((label, [f[key].apart if key in f else None for f in found]))
            continue
        if name not in KEY_COMPARISONS:
            continue
        found = [{(r["config"], _label(r)): r for r in _baseline_rows(d / name) if r["metric"] in KEY_COMPARISONS[name]}
                 for d in [base, *others]]
        for key, row in found[0].items():
            cells = [_verdict(f[key]) if key in f else "-" for f in found]
            label = f"{key[0]} vs {row['baseline']}: {key[1]}"
            lines.append(f"| {title} | {label} | " + " | ".join(cells) + " |")
            signs.append((label, [int(f[key]["apart"]) if key in f else None for f in found]))
    compared = [(label, s) for label, s in signs if None not in s]
    differ = [label for label, s in compared if len(set(s)) > 1]
    summary = f"The verdicts agree in {len(compared) - len(differ)} of {len(compared)} comparisons"
    if differ:
        summary += ("; they differ (beyond the seed spread in one environment, within it in another) for "
                    + "; ".join(differ) + ": five seeds do not settle those, whatever the direction of the means")
    return [*lines, "", summary + ".", ""]


def _comparison_cell(c: compare.Comparison | None) -> str:
    if c is None:
        return "-"
    if c.apart == 0:
        return f"{c.diff:+.2f}, within the seed spread"
    return f"{c.diff:+.2f}, {'above' if c.apart > 0 else 'below'} in every run, chance {c.chance:.2g}"


def _versions(folder: Path) -> str:
    for record in records(folder):
        v = record.get("versions") or {}
        if v:
            return f"torch {v.get('torch')}, Python {v.get('python')}"
    return folder.name


def time_line(recs: list[dict], timed: list[dict]) -> str:
    """``Time: ...`` from the fit runs' wall times and the demo's rows of times.tsv ("" when there is neither)."""
    parts = []
    walls = [r["wall_time_s"] for r in recs if r.get("wall_time_s")]
    if walls:
        parts.append(f"{len(walls)} fit runs, wall time per run {_span(walls)} s")
    if timed:
        wall = sum(float(r["wall_s"]) for r in timed)
        cpu = sum(float(r["cpu_s"]) for r in timed)
        loads = [float(r[k]) for r in timed for k in ("load1_before", "load1_after") if r.get(k)]
        load = _span(loads, 1) if loads else "not recorded"
        parts.append(f"the commands {wall:.0f} s of wall time summed, {cpu:.0f} s of CPU time (one thread per run), "
                     f"1-minute load average {load} on {os.cpu_count()} logical CPUs")
    return f"Time: {'; '.join(parts)}." if parts else ""


def effect_lines(folder: Path, metrics: tuple[str, ...] = ()) -> list[str]:
    """One line per baseline comparison of the demo (of ``metrics`` only, when given): which differences are beyond
    the seed spread, which are not."""
    if not (folder / "baseline.csv").is_file():
        return ood_effect_lines(folder) if (folder / "table.md").is_file() else []
    rows = [r for r in _baseline_rows(folder) if not metrics or r["metric"] in metrics]
    if not rows:
        return []
    lines = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        apart = [r for r in mine if r["apart"] != "0"]
        within = [r for r in mine if r["apart"] == "0"]
        text = f"Beyond the seed spread? `{config}` against `{mine[0]['baseline']}`: "
        if apart:
            text += "yes for " + ", ".join(
                f"{_label(r)} ({float(r['diff']):+.2f}, every run {'above' if r['apart'] == '1' else 'below'}, "
                f"chance {float(r['chance']):.2g})" for r in apart)
        if within:
            text += ("; " if apart else "") + "within the seed spread for " + ", ".join(
                f"{_label(r)} ({float(r['diff']):+.2f})" for r in within)
        lines.append(text + ".")
    return lines


def _baseline_rows(folder: Path) -> list[dict]:
    path = folder / "baseline.csv"
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.is_file() else []


def _verdict(row: dict) -> str:
    """``+21.71, every run above (chance 0.0079)`` or ``-2.05, within the seed spread`` from a baseline.csv row."""
    if row["apart"] == "0":
        return f"{float(row['diff']):+.2f}, within the seed spread"
    side = "above" if row["apart"] == "1" else "below"
    return f"{float(row['diff']):+.2f}, every run {side}, chance {float(row['chance']):.2g}"


def verdicts(folder: Path, config: str) -> str:
    """One phrase for the comparisons of ``config`` with its baseline: which metrics are beyond the seed spread."""
    mine = [r for r in _baseline_rows(folder) if r["config"] == config]
    if not mine:
        return "no comparison with a baseline yet"
    apart = [_label(r) for r in mine if r["apart"] != "0"]
    head = f"{config} against {mine[0]['baseline']}: "
    if not apart:
        return head + "within the seed spread for every metric"
    return head + f"beyond the seed spread for {', '.join(apart)}, within it for the rest"


def _span(values: list[float], digits: int = 0) -> str:
    """``min-max`` of ``values`` (one number when they round alike)."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def _label(row: dict) -> str:
    return row["metric"] if row["metric"] == row["baseline_metric"] else f"{row['metric']} vs {row['baseline_metric']}"


#: EncMin2L against each single detector of the OOD demo, run by run (the same seeds, splits and encoders).
OOD_FUSED = "EncMin2L"
OOD_OTHERS = ("L1[cnn]", "L1[rand_timm]", "Monolithic-RDM", "Mahalanobis[cnn]")
OOD_SETS = ("union", "near_mean", "far_mean", "covariate_mean")


def ood_comparisons(folder: Path) -> list[compare.Comparison]:
    """EncMin2L's AUROC against each other detector's on each OOD set, paired run by run."""
    out = []
    for row in group_runs(find_records([folder])):
        for other in OOD_OTHERS:
            for name in OOD_SETS:
                c = compare.paired_comparison(row, f"ood/{OOD_FUSED}/{name}/auroc", f"ood/{other}/{name}/auroc")
                if c is not None:
                    out.append(c)
    return out


def ood_effect_lines(folder: Path) -> list[str]:
    comparisons = ood_comparisons(folder) if any(folder.rglob("report/results.json")) else []
    if not comparisons:
        return []
    lines = ["EncMin2L against each single detector, run by run (AUROC x 100, Δ = EncMin2L - the other):", ""]
    lines += ["| against | OOD set | Δ | runs | verdict |", "|---|---|---|---|---|"]
    for c in comparisons:
        other, name = c.baseline_metric.split("/")[1], c.metric.split("/")[2]
        lines.append(f"| {other} | {name} | {c.diff:+.2f} | {len(c.values)} | {c.verdict} |")
    return lines


#: The metrics of the thread comparison (besides every ``test/acc_bit*``).
THREAD_METRICS = ("test/acc", "test/mae", "test_acc_last", "final_mean", "ood/EncMin2L/union/auroc")


def threads_section(root: Path) -> list[str]:
    """Seed 0 of every demo with one thread against two (``run_demos.sh threads``), in the tables' units."""
    two = root / "threads2"
    if not two.is_dir():
        return ["(not run: `scripts/demos/run_demos.sh threads`)"]
    lines = ["| demo | run | metric | seed 0, 1 thread | seed 0, 2 threads |", "|---|---|---|---|---|"]
    for name, title, _ in DEMOS:
        one = _rows_by_name(root / name)
        for key, row2 in sorted(_rows_by_name(two / name).items()):
            r1 = next((r for r in getattr(one.get(key), "runs", []) if run_seed(r) == 0), None)
            r2 = next((r for r in row2.runs if run_seed(r) == 0), None)
            if r1 is None or r2 is None:
                continue
            metrics = sorted(m for m in r2.get("metrics") or {} if m in THREAD_METRICS or m.startswith("test/acc_bit"))
            for metric in metrics:
                a, b = run_value(r1, metric), run_value(r2, metric)
                if a is not None and b is not None:
                    lines.append(f"| {title} | {key} | {metric} | {a:.4g} | {b:.4g} |")
    return lines


def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [
        {k.lower() if k in ("Config", "Setting") else k: v for k, v in row.items()}
        for row in csv.DictReader(path.open(encoding="utf-8-sig"))
    ]


def _pm(row: dict, metric: str, digits: int = 1) -> str:
    mean, std = row.get(f"{metric} mean"), row.get(f"{metric} std")
    if not mean:
        return "n/a"
    return f"{float(mean):.{digits}f} ± {float(std or 0):.{digits}f}"


FED_NAMES = {"fedavg": "FedAvg", "local": "Local-only", "fedfree": "FedFree"}
OOD_ROWS = (
    ("EncMin2L", "EncMin2L (2 encoders x 2 variants)"),
    ("L1[cnn]", "L1[cnn] (trained ResNet-8 alone)"),
    ("L1[rand_timm]", "L1[rand_timm] (random ResNet-10-T alone)"),
    ("Monolithic-RDM", "Monolithic RDM (concatenated features)"),
    ("Mahalanobis[cnn]", "Mahalanobis[cnn] (baseline)"),
)


def _rows_by_name(folder: Path) -> dict[str, object]:
    try:
        return {row.name: row for row in group_runs(find_records([folder]))}
    except FileNotFoundError:
        return {}


def fed_summaries(base: Path, rows: list[dict]) -> dict[str, str]:
    """The FedFree demo for README.md and docs/methods/federated.md: means, the per-seed table, verdicts, time."""
    folder = base / "fedfree"
    by_alg = {name.rsplit(":", 1)[-1]: row for name, row in _rows_by_name(folder).items()}
    if not by_alg:
        return {}
    seeds = sorted({run_seed(r) for row in by_alg.values() for r in row.runs})
    table = ["| Algorithm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---|" * (len(seeds) + 1)]
    means = []
    versus = {r["config"]: r for r in _baseline_rows(folder) if r["metric"] == "final_mean"}
    for alg, title in FED_NAMES.items():
        row = by_alg.get(alg)
        if row is None:
            continue
        values = {run_seed(r): run_value(r, "final_mean") for r in row.runs}
        cells = [f"{values[s]:.2f}" if values.get(s) is not None else "-" for s in seeds]
        summary = _pm(_table_row(folder, row.name), "final_mean")
        table.append(f"| {title} | " + " | ".join(cells) + f" | {summary} |")
        against = versus.get(row.name)
        means.append(f"{title} {summary}" + (f" (against Local-only: {_verdict(against)})" if against else ""))
    effect = " ".join(effect_lines(folder, ("final_mean",)))
    time = time_line([], [r for r in rows if r["demo"].startswith("fedfree") and r["threads"] == "1"])
    return {"readme_fedfree": f"seeds {seeds_text(folder)}: " + "; ".join(means) + ".",
            "fedfree_seeds": "\n".join(table), "fedfree_effect": effect, "fedfree_time": time}


def ood_summaries(base: Path, rows: list[dict]) -> dict[str, str]:
    """The OOD demo for README.md and docs/methods/ood.md: the detector table, paired verdicts, time."""
    folder = base / "ood"
    table_rows = _csv_rows(folder / "table.csv")
    if not table_rows:
        return {}
    row = table_rows[0]
    sets = ("union", "near_mean", "far_mean", "covariate_mean")
    table = ["| Detector | union of shifts | near (digits 5-9) | far (photo patches) | covariate (noisy digits) |",
             "|---|---|---|---|---|"]
    for name, title in OOD_ROWS:
        cells = [_pm(row, f"ood/{name}/{s}/auroc", 2) for s in sets]
        table.append(f"| {title} | " + " | ".join("" if c == "n/a" else c for c in cells) + " |")
    union = {name: _pm(row, f"ood/{name}/union/auroc", 2) for name, _ in OOD_ROWS}
    pairs = [c for c in ood_comparisons(folder) if c.metric.endswith("/union/auroc")]
    verdicts = "; ".join(f"against {c.baseline_metric.split('/')[1]} {c.diff:+.2f}, {c.verdict}" for c in pairs)
    fused = " / ".join(_pm(row, f"ood/EncMin2L/{s}/auroc", 2) for s in sets[1:])
    time = time_line([], [r for r in rows if r["demo"].startswith("ood") and r["threads"] == "1"])
    return {
        "readme_ood": (f"seeds {seeds_text(folder)}; union of shifts (ID vs all OOD sets pooled): EncMin2L "
                       f"{union['EncMin2L']}, trained ResNet-8 "
                       f"alone {union['L1[cnn]']}, random ResNet-10-T alone {union['L1[rand_timm]']}, Mahalanobis on "
                       f"the trained encoder {union['Mahalanobis[cnn]']}; EncMin2L near / far / covariate {fused}. "
                       f"Run by run on the union: {verdicts}"),
        "ood_table": "\n".join(table), "ood_effect": "\n".join(ood_effect_lines(folder)), "ood_time": time,
    }


def _table_row(folder: Path, name: str) -> dict:
    return next((r for r in _csv_rows(folder / "table.csv") if f"{r['config']} {r['setting']}".strip() == name), {})


def summaries(base: Path) -> dict[str, str]:
    """Short generated texts for the marked places in README.md and docs/methods/*.md."""
    rows = times(base)
    out: dict[str, str] = {**fed_summaries(base, rows), **ood_summaries(base, rows)}
    quick = _csv_rows(base / "quickstart" / "table.csv")
    if quick:
        out["readme_quickstart"] = f"{_pm(quick[0], 'test/acc')}%"
        out["quickstart_seeds"] = f"seeds {seeds_text(base / 'quickstart')}"
        recs = records(base / "quickstart")
        timed = [r for r in rows if r["demo"] == "quickstart" and r["threads"] == "1"]
        walls = [r["wall_time_s"] for r in recs if r.get("wall_time_s")]
        if walls and timed:
            cpu = sum(float(r["cpu_s"]) for r in timed) / len(walls)
            loads = [float(r[k]) for r in timed for k in ("load1_before", "load1_after") if r.get(k)]
            out["quickstart_time"] = (
                f"Each run used about {cpu:.0f} s of CPU time (one thread; {_span(walls)} s of wall time for the fit "
                f"on a {os.cpu_count()}-core machine, 1-minute load average {_span(loads, 1)})"
            )
    for name, extra in (("multibit", "cost.md"), ("tunnel", "summary.md")):
        parts = [(base / name / f).read_text().strip() for f in ("table.md", extra) if (base / name / f).is_file()]
        if name == "tunnel":
            parts = parts[1:] if len(parts) > 1 else parts
        out[name] = "\n\n".join(parts)
    for name in ("hpn", "early_cutting"):
        path = base / name / "table.md"
        out[name] = path.read_text().strip() if path.is_file() else "(not run yet)"
    bits = (1, 2, 3, 4, 8, 32)
    for row in _csv_rows(base / "multibit" / "table.csv"):
        accs = " / ".join(_pm(row, f"test/acc_bit{b}") for b in bits)
        out[f"readme_multibit_{row['config']}"] = f"{row['config']} ({row['n']} seeds): {accs} % at 1/2/3/4/8/32 bits"
    out["readme_multibit"] = "; ".join(v for k, v in sorted(out.items()) if k.startswith("readme_multibit_")) + (
        f"; {verdicts(base / 'multibit', 'digits_emq')} (3 bits never trained; mean ± std, one CPU thread; cost, times "
        "and other library versions, where the verdict changes, in docs/demos.md)"
    )
    hpn = []
    for row in _csv_rows(base / "hpn" / "table.csv"):
        hpn.append(f"{row['setting']}: {_pm(row, 'test/acc')} / {_pm(row, 'test/mae', 3)}")
    out["readme_hpn"] = "; ".join(hpn) if hpn else "(not run yet)"
    tunnel = base / "tunnel" / "summary.md"
    if tunnel.is_file():
        lines = tunnel.read_text().splitlines()
        rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and line[2].isdigit()]
        ranks = " ".join(f"{float(r[3].split('+-')[0]):.0f}" for r in rows)
        accs = [float(r[2].split("+-")[0]) for r in rows]
        out["readme_tunnel"] = (
            f"{lines[0].split(';')[1].strip()}; mean numerical rank per layer {ranks}; mean probe "
            f"accuracy {min(accs):.1f}-{max(accs):.1f}% at every layer (the logits: "
            f"{rows[-1][2].strip()}) - the rank falls in the last layers."
        )
    return out


def fill(path: Path, texts: dict[str, str]) -> None:
    """Replace the text between ``<!-- demos:KEY -->`` and ``<!-- /demos:KEY -->`` (or after a lone opening marker)
    with ``texts[KEY]``."""
    import re

    text = path.read_text()
    for key, value in texts.items():
        start, end = f"<!-- demos:{key} -->", f"<!-- /demos:{key} -->"
        if start not in text:
            continue
        new = f"{start}{value}{end}"
        if end in text:
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m, new=new: new, text, flags=re.S)
        else:
            text = text.replace(start, new)
    path.write_text(text)


def _commands(root: str, out: str, others: tuple[str, ...]) -> list[str]:
    """The commands that regenerate this page, with the folders it was generated from."""
    env = "" if root == "runs/demos" else f"DEMO_DIR={root} "
    lines = [f"{env}scripts/demos/run_demos.sh && {env}scripts/demos/run_demos.sh threads"]
    lines += [f"DEMO_DIR={o} scripts/demos/run_demos.sh quickstart   # in the environment of the other versions"
              for o in others]
    lines.append(" ".join(["python scripts/demos/collect.py", *([root, out, *others] if others or root != "runs/demos"
                                                               or out != "docs/demos.md" else [])]))
    return lines


def main(root: str = "runs/demos", out: str = "docs/demos.md", *others: str) -> None:
    base = Path(root)
    rows = times(base)
    lines = [
        "# The digits demos: numbers over seeds, times, thread sensitivity",
        "",
        "Generated by `python scripts/demos/collect.py` from the outputs of `scripts/demos/run_demos.sh` (which runs",
        "`lightning-methods grid` / `select` and `lightning-methods table`); do not edit the numbers by hand, rerun:",
        "",
        "```bash",
        *_commands(root, out, others),
        "```",
        "",
        f"Machine of these numbers: {machine(base)}.",
        "",
        f"Each value is mean ± sample std over seeds {seeds_text(base)} (seed_everything and the data seed: split,",
        "noise, order, initialisation). Float results depend on the CPU's kernels, the thread count and library",
        "versions, so a single run's digits are not a claim; the last section shows seed 0 again with two threads.",
        "A method's difference to its baseline is *beyond the seed spread* when every run of one is above every run",
        "of the other (`lightning-methods table --baseline`; docs/results.md gives the chance of that by the seed",
        "alone: 2 / C(2n, n) for n seeds on each side, 0.008 for 5 against 5).",
        "",
    ]
    texts = summaries(base)
    for name, title, what in DEMOS:
        folder = base / name
        lines += [f"## {title}", "", what + ".", ""]
        table = folder / "table.md"
        if name == "ood" and texts.get("ood_table"):  # one row per detector instead of one column per metric
            lines += [texts["ood_table"], "", "Mean ± std (ddof=1) over the seeds; AUROC x 100.", ""]
        elif table.is_file():
            lines += [table.read_text().strip(), ""]
        elif not (name in EXTRA and (folder / EXTRA[name]).is_file()):
            lines += ["(not run yet)", ""]
        if name in EXTRA and (folder / EXTRA[name]).is_file():
            lines += [(folder / EXTRA[name]).read_text().strip(), ""]
        if name in NOTES:
            lines += [NOTES[name], ""]
        if name == "ood" and texts.get("ood_effect"):  # the other demos' table.md holds their comparison already
            lines += [texts["ood_effect"], ""]
        time = time_line(records(folder), [r for r in rows if r["demo"].startswith(name) and r["threads"] == "1"])
        if time:
            lines += [time, ""]
    lines += [VIT_NOTE, "## One thread against two (seed 0)", ""] + threads_section(base) + [""]
    lines += other_versions_section(base, [Path(p) for p in others])
    Path(out).write_text("\n".join(lines))
    print(f"wrote {out}")
    for doc in (
        "README.md",
        "docs/methods/federated.md",
        "docs/methods/ood.md",
        "docs/methods/quantization.md",
        "docs/methods/hpn.md",
        "docs/methods/tunnel.md",
        "docs/methods/noisy_labels.md",
    ):
        if Path(doc).is_file():
            fill(Path(doc), texts)


if __name__ == "__main__":
    main(*sys.argv[1:])
