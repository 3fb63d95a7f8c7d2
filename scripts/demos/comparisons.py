"""Verdicts for the demo pages: each method against its baseline (``table --baseline``'s baseline.csv), EncMin2L
against each single detector run by run, and the same verdicts under other library versions."""

from __future__ import annotations

from pathlib import Path

from demo_data import DEMOS, baseline_rows, label, rows_by_name, verdict, versions_of

from lightning_methods.results import compare, find_records, group_runs
from lightning_methods.results.aggregate import row_values, summarize


def effect_lines(folder: Path, metrics: tuple[str, ...] = ()) -> list[str]:
    """One line per baseline comparison of the demo (of ``metrics`` only, when given): which differences are beyond
    the seed spread, which are not."""
    if not (folder / "baseline.csv").is_file():
        return ood_effect_lines(folder) if (folder / "table.md").is_file() else []
    rows = [r for r in baseline_rows(folder) if not metrics or r["metric"] in metrics]
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
                f"{label(r)} ({verdict(r)})" for r in apart)
        if within:
            text += ("; " if apart else "") + "within the seed spread for " + ", ".join(
                f"{label(r)} ({float(r['diff']):+.2f})" for r in within)
        lines.append(text + ".")
    return lines


def verdicts(folder: Path, config: str) -> str:
    """One phrase for the comparisons of ``config`` with its baseline: which metrics are beyond the seed spread."""
    mine = [r for r in baseline_rows(folder) if r["config"] == config]
    if not mine:
        return "no comparison with a baseline yet"
    apart = [label(r) for r in mine if r["apart"] != "0"]
    head = f"{config} against {mine[0]['baseline']}: "
    if not apart:
        return head + "within the seed spread for every metric"
    return head + f"beyond the seed spread for {', '.join(apart)}, within it for the rest"


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


def other_versions_section(base: Path, others: list[Path]) -> list[str]:
    """The quickstart under other library versions against the main runs: do the numbers hold elsewhere?"""
    if not others:
        return []
    def row_and_versions(folder: Path) -> tuple[object, str] | None:
        rows = list(rows_by_name(folder / "quickstart").values())
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
        mean, std = summarize([row], ["test/acc"])[0].stats["test/acc"]  # the table's own mean +- std
        if folder == base:
            cell = "(the runs above)"
        else:
            c = compare.Comparison(row.name, "test/acc", "main", "test/acc", tuple(values),
                                   tuple(row_values(main_row[0], "test/acc")))
            cell = f"Δ {c.diff:+.2f}, {c.verdict}"
        lines.append(f"| {versions} | {len(values)} | {mean:.2f} ± {std:.2f} | {cell} |")
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
    head = ["demo", "comparison", versions_of(base), *map(versions_of, others)]
    signs: list[tuple[str, list[int | None]]] = []
    lines = ["Every demo in those environments too: does each verdict against the baseline hold?", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, title, _ in DEMOS:
        if name == "ood":
            found = [{f"{c.metric} vs {c.baseline_metric}": c for c in ood_comparisons(d / name)
                      if c.metric.endswith("/union/auroc")} for d in [base, *others]]
            for key in found[0]:
                cells = [comparison_cell(f.get(key)) for f in found]
                what = f"{key.replace('/union/auroc', '')} (union)"
                lines.append(f"| {title} | {what} | " + " | ".join(cells) + " |")
                signs.append((what, [f[key].apart if key in f else None for f in found]))
            continue
        if name not in KEY_COMPARISONS:
            continue
        found = [{(r["config"], label(r)): r for r in baseline_rows(d / name) if r["metric"] in KEY_COMPARISONS[name]}
                 for d in [base, *others]]
        for key, row in found[0].items():
            cells = [verdict(f[key]) if key in f else "-" for f in found]
            what = f"{key[0]} vs {row['baseline']}: {key[1]}"
            lines.append(f"| {title} | {what} | " + " | ".join(cells) + " |")
            signs.append((what, [int(f[key]["apart"]) if key in f else None for f in found]))
    compared = [(what, s) for what, s in signs if None not in s]
    differ = [what for what, s in compared if len(set(s)) > 1]
    summary = f"The verdicts agree in {len(compared) - len(differ)} of {len(compared)} comparisons"
    if differ:
        summary += ("; they differ (beyond the seed spread in one environment, within it in another) for "
                    + "; ".join(differ) + ": five seeds do not settle those, whatever the direction of the means")
    return [*lines, "", summary + ".", ""]


def comparison_cell(c: compare.Comparison | None) -> str:
    if c is None:
        return "-"
    if c.apart == 0:
        return f"{c.diff:+.2f}, within the seed spread"
    return f"{c.diff:+.2f}, {'above' if c.apart > 0 else 'below'} in every run, chance {c.chance:.2g}"
