"""Mean +- std tables (Markdown and CSV) and learning curves (PNG) over seeds, from run directories or a W&B project.

    lightning-methods table runs/grid/sam_vs_samon [more run or grid directories, results.json files]
    lightning-methods table wandb:ENTITY/PROJECT [--filter group=...]   # online

Every run writes ``results.json`` (:class:`~lightning_methods.callbacks.ResultsWriter`); runs of one configuration
(same resolved config up to the seed) form one row with ``n`` and mean +- sample std (``--ddof``) of each metric
(``test/acc``, ``best/val/acc`` = validation at the best epoch, ``last/val/acc`` by default; accuracies in percent),
and the paper's number beside ours when the config names it (a ``# paper: test/acc=84.2`` header line, see
:func:`lightning_methods.results.aggregate.paper_numbers`). Writes ``table.md``, ``table.csv`` and ``curves.png``
(mean +- std band over seeds of ``--curve``, default ``val/acc``) into ``--output`` (default: the first directory);
with ``--wandb_project P`` the table (and the comparison, and the curves) also go to a new W&B run
``table-<output folder>`` of project ``P``.
``--baseline NAME`` adds each other row's difference to that row and whether it is beyond the seed spread
(:mod:`.compare`), below the table and in ``baseline.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_methods.results import compare
from lightning_methods.results.aggregate import Row, curves, default_metrics, group_runs, summarize
from lightning_methods.results.gridspec import DEFAULT_SEED_KEYS
from lightning_methods.results.record import find_records
from lightning_methods.utils import atomic_write_text
from lightning_methods.utils.wandb import finish_open_run


@dataclass
class Table:
    """What :func:`main` built: the rows, the metrics and the files written."""

    rows: list[Row]
    metrics: list[str]
    markdown: str
    files: list[Path]
    comparisons: list[compare.Comparison]


def cell(row: Row, metric: str, digits: int = 2) -> str:
    if metric not in row.stats:
        return "-"
    mean, std = row.stats[metric]
    text = f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text + (f" (n={row.counts[metric]})" if row.counts[metric] != row.n else "")


def markdown(rows: Sequence[Row], metrics: Sequence[str], ddof: int = 1) -> str:
    """The table in the shape of the README's method tables (paper columns only where a config names a number)."""
    papers = [m for m in metrics if any(m in r.paper for r in rows)]
    head = ["Config", "n", *metrics, *(f"Paper: {m}" for m in papers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        paper = [f"{row.paper[m]:g}" if m in row.paper else "" for m in papers]
        lines.append("| " + " | ".join([f"`{row.name}`", str(row.n), *(cell(row, m) for m in metrics), *paper]) + " |")
    lines.append("")
    note = "Paper columns: the papers' numbers (`# paper:` lines of the configs), not ours." if papers else ""
    legend = f"Mean ± std (ddof={ddof}) over the n runs (seeds) of each configuration; accuracies in %."
    lines.append(f"{legend} {note}" if note else legend)
    return "\n".join(lines) + "\n"


def csv_header(metrics: Sequence[str]) -> list[str]:
    return ["config", "setting", "n", "seeds", *(f"{m} {s}" for m in metrics for s in ("mean", "std", "n")),
            *(f"paper {m}" for m in metrics)]


def csv_rows(rows: Sequence[Row], metrics: Sequence[str]) -> list[list[Any]]:
    """One line per row under :func:`csv_header` (table.csv and the W&B table)."""
    lines = []
    for row in rows:
        values = []
        for m in metrics:
            mean, std = row.stats.get(m, (math.nan, math.nan))
            values += [f"{mean:.6g}", f"{std:.6g}", row.counts.get(m, 0)]
        lines.append([row.label, row.setting, row.n, " ".join(map(str, row.seeds)), *values,
                      *(row.paper.get(m, "") for m in metrics)])
    return lines


def csv_text(rows: Sequence[Row], metrics: Sequence[str]) -> str:
    return _csv(csv_header(metrics), csv_rows(rows, metrics))


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def plot_curves(rows: Sequence[Row], metric: str, path: Path, ddof: int = 1) -> Path | None:
    """Mean +- std band (``ddof``) over seeds of ``metric`` per epoch, one line per configuration (matplotlib,
    Agg)."""
    series = [(row, curves(row, metric, ddof)) for row in rows]
    series = [(row, c) for row, c in series if c is not None]
    if not series:
        return None
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("learning-curve plots need matplotlib (a dependency of lightning-methods): pip install "
                          "matplotlib "
                          "(or pass --no_plot)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row, (epochs, mean, std) in series:
        (line,) = ax.plot(epochs, mean, label=f"{row.name} (n={row.n})")
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric} (%)" if "acc" in metric else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-methods table", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run or grid directories, results.json files, or wandb:ENTITY/PROJECT")
    parser.add_argument("--metrics", nargs="+", help="metrics to tabulate (default: test/acc, best/val/acc, "
                        "last/val/acc where present)")
    parser.add_argument("--curve", default="val/acc", help="metric of the learning-curve plot (default: val/acc)")
    parser.add_argument("--output", help="directory for table.md, table.csv, curves.png (default: the first "
                        "directory given, or the current directory)")
    parser.add_argument("--ddof", type=int, default=1, help="delta degrees of freedom of the std (default: 1)")
    parser.add_argument("--seed_keys", nargs="+", default=list(DEFAULT_SEED_KEYS),
                        help="config keys that hold the seed (ignored when grouping runs)")
    parser.add_argument("--include_unfinished", action="store_true", help="also use runs that did not finish")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="W&B only: run filters (e.g. group=sam-rho=1.0, state=finished)")
    parser.add_argument("--baseline", metavar="NAME", help="compare every other row with this one (its Config cell, "
                        "or a unique part of it): the difference of the means and whether it is beyond the seed "
                        "spread, below the table and in baseline.csv")
    parser.add_argument("--baseline_metric", metavar="METRIC", help="compare every metric with this metric of the "
                        "baseline (default: the same metric)")
    parser.add_argument("--paired", action="store_true", help="compare each run with the baseline's run of the "
                        "same seed (one sign in every seed, chance 2 / 2^n) instead of the two rows' ranges: for rows "
                        "that share what the seed decides (split, partition, initialisation)")
    parser.add_argument("--no_plot", action="store_true", help="skip the learning-curve plot")
    parser.add_argument("--wandb_project", default=None,
                        help="also log the table, the baseline comparison and the learning curves to a new W&B run in "
                        "this project")
    parser.add_argument("--wandb_mode", choices=("online", "offline"), default=None,
                        help="W&B mode of that run (default: W&B's own setting, e.g. WANDB_MODE)")
    return parser


def main(args: list[str] | None = None) -> Table:
    """Entry point of ``lightning-methods table`` (see the module docstring); prints the Markdown table."""
    parser = build_parser()
    ns = parser.parse_args(sys.argv[1:] if args is None else args)
    for option in ("baseline_metric", "paired"):
        if getattr(ns, option) and not ns.baseline:
            parser.error(f"--{option} needs --baseline NAME (the row to compare with)")
    records: list[dict[str, Any]] = []
    local = [r for r in ns.runs if not r.startswith("wandb:")]
    if local:
        records += find_records(local)
    for source in (r for r in ns.runs if r.startswith("wandb:")):
        from lightning_methods.results.wandb_source import wandb_records

        records += wandb_records(source[len("wandb:") :], ns.filter)
    unfinished = [r for r in records if r.get("status") != "finished" or r.get("command") not in (None, "fit")]
    if not ns.include_unfinished:
        records = [r for r in records if r.get("status") == "finished" and r.get("command") in (None, "fit")]
        if unfinished:
            names = (str(r.get("path") or r.get("run_dir") or r.get("run_id")) for r in unfinished[:5])  # the file
            print(f"left out {len(unfinished)} runs that are not finished fits (--include_unfinished to keep them): "
                  + ", ".join(names), file=sys.stderr)
    if not records:
        raise ValueError("no finished runs to tabulate")
    metrics = ns.metrics or default_metrics(records)
    rows = summarize(group_runs(records, ns.seed_keys), metrics, ns.ddof)
    for row in rows:
        if len(set(map(str, row.seeds))) < row.n:
            print(f"warning: {row.name} holds runs with the same seed ({row.seeds}); they are counted separately",
                  file=sys.stderr)
    comparisons = []
    if ns.baseline:
        comparisons = compare.compare_rows(rows, compare.find_row(rows, ns.baseline), metrics, ns.baseline_metric,
                                           ns.paired)
    text = markdown(rows, metrics, ns.ddof) + ("\n" + compare.markdown(comparisons) if comparisons else "")
    print(text)
    first_dir = next((Path(r) for r in local if Path(r).is_dir()), Path("."))
    out = Path(ns.output) if ns.output else first_dir
    files = [atomic_write_text(out / "table.md", text), atomic_write_text(out / "table.csv", csv_text(rows, metrics))]
    if ns.baseline:
        files.append(atomic_write_text(out / "baseline.csv", _csv(compare.CSV_HEADER, compare.csv_rows(comparisons))))
    if not ns.no_plot:
        png = plot_curves(rows, ns.curve, out / "curves.png", ns.ddof)
        files += [png] if png else []
    print("written: " + ", ".join(map(str, files)))
    table = Table(rows, metrics, text, files, comparisons)
    if ns.wandb_project:
        settings = {"project": ns.wandb_project, "name": f"table-{out.resolve().name}", "job_type": "table",
                    "save_dir": str(out.resolve()), **({"mode": ns.wandb_mode} if ns.wandb_mode else {})}
        log_to_wandb(table, None if ns.no_plot else out / "curves.png", settings)
        print(f"logged the table{'' if ns.no_plot else ' and curves.png'} to the W&B project {ns.wandb_project}")
    return table


def log_to_wandb(table: Table, curves_png: Path | None, settings: dict[str, Any]) -> None:
    """The rows (``table/rows``), the baseline comparison (``table/baseline``) and the curves picture
    (``table/curves``) in a new W&B run with ``settings`` (a ``WandbLogger``'s arguments), finished afterwards."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    payload: dict[str, Any] = {"table/rows": wandb.Table(columns=csv_header(table.metrics),
                                                         data=csv_rows(table.rows, table.metrics))}
    if table.comparisons:
        payload["table/baseline"] = wandb.Table(columns=list(compare.CSV_HEADER),
                                                data=compare.csv_rows(table.comparisons))
    if curves_png is not None and curves_png.is_file():
        payload["table/curves"] = wandb.Image(str(curves_png))
    WandbLogger(**settings).experiment.log(payload)
    finish_open_run(exit_code=0)
