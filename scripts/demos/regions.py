"""The generated texts of the ``<!-- demos:KEY -->`` regions of README.md and docs/methods/*.md."""

from __future__ import annotations

import os
import re
from pathlib import Path

from comparisons import effect_lines, ood_comparisons, ood_effect_lines, verdicts
from demo_data import (
    baseline_rows,
    csv_rows,
    demo_times,
    pm,
    records,
    rows_by_name,
    seeds_text,
    span,
    table_row,
    time_line,
    times,
    verdict,
)

from lightning_methods.results.aggregate import run_seed, run_value

FED_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "perfedavg": "Per-FedAvg", "pfedla": "pFedLA",
             "local": "Local-only", "fedfree": "FedFree"}


OOD_ROWS = (
    ("EncMin2L", "EncMin2L (2 encoders x 2 variants)"),
    ("L1[cnn]", "L1[cnn] (trained ResNet-8 alone)"),
    ("L1[rand_timm]", "L1[rand_timm] (random ResNet-10-T alone)"),
    ("Monolithic-RDM", "Monolithic RDM (concatenated features)"),
    ("Mahalanobis[cnn]", "Mahalanobis[cnn] (baseline)"),
)


def fed_summaries(base: Path, rows: list[dict]) -> dict[str, str]:
    """The FedFree demo for README.md and docs/methods/federated.md: means, the per-seed table, verdicts, time."""
    folder = base / "fedfree"
    by_alg = {name.rsplit(":", 1)[-1]: row for name, row in rows_by_name(folder).items()}
    if not by_alg:
        return {}
    seeds = sorted({run_seed(r) for row in by_alg.values() for r in row.runs})
    table = ["| Algorithm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---|" * (len(seeds) + 1)]
    means = []
    versus = {r["config"]: r for r in baseline_rows(folder) if r["metric"] == "final_mean"}
    for alg, title in FED_NAMES.items():
        row = by_alg.get(alg)
        if row is None:
            continue
        values = {run_seed(r): run_value(r, "final_mean") for r in row.runs}
        cells = [f"{values[s]:.2f}" if values.get(s) is not None else "-" for s in seeds]
        summary = pm(table_row(folder, row.name), "final_mean")
        table.append(f"| {title} | " + " | ".join(cells) + f" | {summary} |")
        against = versus.get(row.name)
        means.append(f"{title} {summary}" + (f" (against Local-only: {verdict(against)})" if against else ""))
    effect = " ".join(effect_lines(folder, ("final_mean",)))
    time = time_line([], demo_times(rows, "fedfree"))
    return {"readme_fedfree": f"seeds {seeds_text(folder)}: " + "; ".join(means) + ".",
            "fedfree_seeds": "\n".join(table), "fedfree_effect": effect, "fedfree_time": time}


def ood_summaries(base: Path, rows: list[dict]) -> dict[str, str]:
    """The OOD demo for README.md and docs/methods/ood.md: the detector table, paired verdicts, time."""
    folder = base / "ood"
    table_rows = csv_rows(folder / "table.csv")
    if not table_rows:
        return {}
    row = table_rows[0]
    sets = ("union", "near_mean", "far_mean", "covariate_mean")
    table = ["| Detector | union of shifts | near (digits 5-9) | far (photo patches) | covariate (noisy digits) |",
             "|---|---|---|---|---|"]
    for name, title in OOD_ROWS:
        cells = [pm(row, f"ood/{name}/{s}/auroc", 2) for s in sets]
        table.append(f"| {title} | " + " | ".join("" if c == "n/a" else c for c in cells) + " |")
    union = {name: pm(row, f"ood/{name}/union/auroc", 2) for name, _ in OOD_ROWS}
    pairs = [c for c in ood_comparisons(folder) if c.metric.endswith("/union/auroc")]
    union_verdicts = "; ".join(f"against {c.baseline_metric.split('/')[1]} {c.diff:+.2f}, {c.verdict}" for c in pairs)
    fused = " / ".join(pm(row, f"ood/EncMin2L/{s}/auroc", 2) for s in sets[1:])
    time = time_line([], demo_times(rows, "ood"))
    return {
        "readme_ood": (f"seeds {seeds_text(folder)}; union of shifts (ID vs all OOD sets pooled): EncMin2L "
                       f"{union['EncMin2L']}, trained ResNet-8 "
                       f"alone {union['L1[cnn]']}, random ResNet-10-T alone {union['L1[rand_timm]']}, Mahalanobis on "
                       f"the trained encoder {union['Mahalanobis[cnn]']}; EncMin2L near / far / covariate {fused}. "
                       f"Run by run on the union: {union_verdicts}"),
        "ood_table": "\n".join(table), "ood_effect": "\n".join(ood_effect_lines(folder)), "ood_time": time,
    }


#: demos of one metric whose rows are compared with one baseline row: demo -> (metric, baseline's name in the text)
VERSUS_DEMOS = {"sam": ("test/acc", "SGD"), "sam_long": ("test/acc", "SGD"), "koala": ("test/acc", "SGD"),
                "distillation": ("test/acc", "the student")}


def versus_summaries(base: Path) -> dict[str, str]:
    """The SAM, KOALA and distillation demos for README.md and their method pages: every row's mean ± std, its
    verdict against the baseline (seed by seed) and the table (times: the demos page)."""
    out = {}
    for name, (metric, baseline) in VERSUS_DEMOS.items():
        folder = base / name
        table_rows = csv_rows(folder / "table.csv")
        if not table_rows:
            continue
        versus = {r["config"]: r for r in baseline_rows(folder) if r["metric"] == metric}
        parts = []
        for row in table_rows:
            label = f"{row['config']} {row.get('setting') or ''}".strip()
            if row["n"] == "1":  # one run (the distillation teacher): no spread, and one pair shows nothing
                parts.append(f"{label} {float(row[f'{metric} mean']):.1f} (one run)")
                continue
            text = f"{label} {pm(row, metric)}"
            if label in versus:
                text += f" (against {baseline}: {verdict(versus[label])})"
            parts.append(text)
        out[f"readme_{name}"] = (f"seeds {seeds_text(folder)}, test accuracy % after the last epoch: "
                                 + "; ".join(parts) + ".")
        out[name] = (folder / "table.md").read_text().strip()
    return out


def summaries(base: Path) -> dict[str, str]:
    """Short generated texts for the marked places in README.md and docs/methods/*.md."""
    rows = times(base)
    out: dict[str, str] = {**fed_summaries(base, rows), **ood_summaries(base, rows), **versus_summaries(base)}
    quick = csv_rows(base / "quickstart" / "table.csv")
    if quick:
        out["readme_quickstart"] = f"{pm(quick[0], 'test/acc')}%"
        out["quickstart_seeds"] = f"seeds {seeds_text(base / 'quickstart')}"
        recs = records(base / "quickstart")
        timed = demo_times(rows, "quickstart")
        walls = [r["wall_time_s"] for r in recs if r.get("wall_time_s")]
        if walls and timed:
            cpu = sum(float(r["cpu_s"]) for r in timed) / len(walls)
            loads = [float(r[k]) for r in timed for k in ("load1_before", "load1_after") if r.get(k)]
            out["quickstart_time"] = (
                f"Each run used about {cpu:.0f} s of CPU time (one thread; {span(walls)} s of wall time for the fit "
                f"on a {os.cpu_count()}-core machine, 1-minute load average {span(loads, 1)})"
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
    for row in csv_rows(base / "multibit" / "table.csv"):
        accs = " / ".join(pm(row, f"test/acc_bit{b}") for b in bits)
        out[f"readme_multibit_{row['config']}"] = f"{row['config']} ({row['n']} seeds): {accs} % at 1/2/3/4/8/32 bits"
    out["readme_multibit"] = "; ".join(v for k, v in sorted(out.items()) if k.startswith("readme_multibit_")) + (
        "".join(f"; {verdicts(base / 'multibit', c)}" for c in ("digits_emq", "digits_lsq")
                if any(r["config"] == c for r in csv_rows(base / "multibit" / "table.csv")))
        + " (3 bits never trained; mean ± std, one CPU thread; cost, times "
        "and other library versions, where the verdict changes, in docs/demos.md)"
    )
    hpn = []
    for row in csv_rows(base / "hpn" / "table.csv"):
        hpn.append(f"{row['setting']}: {pm(row, 'test/acc')} / {pm(row, 'test/mae', 3)}")
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


def fill(path: Path, texts: dict[str, str], page: str = "demos") -> None:
    """Replace the text between ``<!-- PAGE:KEY -->`` and ``<!-- /PAGE:KEY -->`` (or after a lone opening marker)
    with ``texts[KEY]``; ``page`` is the stem of the demos page whose numbers the region carries (``demos``: the main
    page docs/demos.md; ``demos_amd_epyc``: docs/demos_amd_epyc.md)."""

    text = path.read_text()
    for key, value in texts.items():
        start, end = f"<!-- {page}:{key} -->", f"<!-- /{page}:{key} -->"
        if start not in text:
            continue
        new = f"{start}{value}{end}"
        if end in text:
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m, new=new: new, text, flags=re.S)
        else:
            text = text.replace(start, new)
    path.write_text(text)
