"""The OpenOOD-style report of the EncMin2L pipeline: metrics of every detector on every OOD set and the group means,
as CSV / JSON files, a printed table, ROC curves and score histograms (PNG, matplotlib's Agg backend) and W&B
entries."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_methods.ood.metrics import METRIC_NAMES, Convention, group_means, ood_metrics, roc_curve
from lightning_methods.utils import atomic_write_json, atomic_write_text

HEADERS = {"auroc": "AUROC", "fpr95": "FPR@95", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out"}


@dataclass
class Detector:
    """ID-confidences of one detector (higher = more ID).

    Attributes:
        name: row name (``"EncMin2L"``, ``"L1[dino]"``, ``"kNN[resnet]"``, ...).
        kind: ``"fused"``, ``"level1"``, ``"rdm"``, ``"baseline"``.
        id_conf: confidences of the ID test set.
        ood_conf: ``{dataset: confidences}``.
        params: stored parameters of the detector (score networks, statistics), for the parameter comparison.
    """

    name: str
    kind: str
    id_conf: np.ndarray
    ood_conf: dict[str, np.ndarray]
    params: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    means: dict[str, dict[str, float]] = field(default_factory=dict)


#: name of the pseudo OOD set that pools every OOD set (the "union of shifts")
UNION = "union"


def evaluate(detectors: list[Detector], groups: Mapping[str, str], convention: Convention = "v1.5") -> None:
    """Fill ``metrics`` (per OOD set, and ``"union"``: ID against every OOD set pooled, when there are several) and
    ``means`` (per group) of every detector."""
    for det in detectors:
        det.metrics = {name: ood_metrics(det.id_conf, conf, convention) for name, conf in det.ood_conf.items()}
        if len(det.ood_conf) > 1:
            pooled = np.concatenate(list(det.ood_conf.values()))
            det.metrics[UNION] = ood_metrics(det.id_conf, pooled, convention)
        det.means = group_means(det.metrics, {n: g for n, g in groups.items() if n in det.metrics})


def long_rows(detectors: list[Detector], groups: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per (detector, OOD set or group mean), metrics in percent."""
    rows = []
    for det in detectors:
        for name, values in [*det.metrics.items(), *((f"{g}_mean", v) for g, v in det.means.items())]:
            group = groups.get(name, name[:-5] if name.endswith("_mean") else UNION if name == UNION else "")
            rows.append({"detector": det.name, "kind": det.kind, "params": det.params, "dataset": name,
                         "group": group, **{m: round(100 * values[m], 4) for m in METRIC_NAMES}})
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def summary_rows(detectors: list[Detector]) -> list[dict[str, Any]]:
    """Wide rows: detector, params, per-group AUROC / FPR@95 means and per-set AUROC (percent)."""
    rows = []
    for det in detectors:
        row: dict[str, Any] = {"detector": det.name, "kind": det.kind, "params": det.params}
        for g, values in det.means.items():
            row[f"{g}/AUROC"] = round(100 * values["auroc"], 2)
            row[f"{g}/FPR@95"] = round(100 * values["fpr95"], 2)
        for name, values in det.metrics.items():
            row[f"{name}/AUROC"] = round(100 * values["auroc"], 2)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of summary rows."""
    if not rows:
        return "(no detectors)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    return "\n".join([line, "-" * len(line), *("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)])


def plot_detector(det: Detector, path: Path) -> Path | None:
    """ROC curves (one per OOD set) and histograms of ``-log(conf)`` / confidence for ID vs each OOD set."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        return None
    fig, (ax_roc, ax_hist) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    positive = bool(np.all(det.id_conf > 0) and all(np.all(c > 0) for c in det.ood_conf.values()))
    transform = (lambda c: -np.log(c)) if positive and det.kind in ("fused", "level1") else (lambda c: -c)
    label = "-log p (OOD score)" if positive and det.kind in ("fused", "level1") else "-confidence (OOD score)"
    all_scores = np.concatenate([transform(det.id_conf), *(transform(c) for c in det.ood_conf.values())])
    bins = np.linspace(np.percentile(all_scores, 0.5), np.percentile(all_scores, 99.5), 50)
    ax_hist.hist(transform(det.id_conf), bins=bins, alpha=0.5, density=True, label="ID test")
    for name, conf in det.ood_conf.items():
        fpr, tpr = roc_curve(det.id_conf, conf)  # the pooled "union" has no curve of its own
        ax_roc.plot(fpr, tpr, label=f"{name} ({100 * det.metrics[name]['auroc']:.1f})")
        ax_hist.hist(transform(conf), bins=bins, alpha=0.4, density=True, histtype="stepfilled", label=name)
    ax_roc.set(xlabel="FPR (OOD accepted)", ylabel="TPR (ID accepted)", title=f"{det.name}: ROC (AUROC)")
    ax_hist.set(xlabel=label, ylabel="density", title=f"{det.name}: scores")
    ax_roc.legend(fontsize=7)
    ax_hist.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: Path, detectors: list[Detector], groups: Mapping[str, str],
                 diagnostics: list[dict[str, Any]], extra: Mapping[str, Any], plot_kinds: tuple[str, ...] = (
                     "fused", "level1")) -> dict[str, Any]:
    """Write ``metrics.csv`` (long), ``summary.csv`` (wide), ``diagnostics.csv``, ``results.json``, ``table.txt``
    and the PNG figures into ``out_dir``; returns the file paths and the printed table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, summary = long_rows(detectors, groups), summary_rows(detectors)
    atomic_write_text(out_dir / "metrics.csv", to_csv(rows))
    atomic_write_text(out_dir / "summary.csv", to_csv(summary))
    atomic_write_text(out_dir / "diagnostics.csv", to_csv(diagnostics))
    table = format_table(summary)
    atomic_write_text(out_dir / "table.txt", table + "\n")
    results = {"groups": dict(groups), **extra, "detectors": [
        {"name": d.name, "kind": d.kind, "params": d.params, "metrics": d.metrics, "means": d.means}
        for d in detectors], "diagnostics": diagnostics}
    atomic_write_json(out_dir / "results.json", results)
    images = {}
    for det in detectors:
        if det.kind in plot_kinds:
            safe = det.name.replace("[", "_").replace("]", "").replace("/", "_")
            path = plot_detector(det, out_dir / f"{safe}.png")
            if path is not None:
                images[det.name] = str(path)
    return {"rows": rows, "summary": summary, "table": table, "images": images}


def log_to_wandb(experiment: Any, report: Mapping[str, Any], diagnostics: list[dict[str, Any]]) -> None:
    """Log the report to a W&B run: tables, group means as summary metrics, the figures."""
    import wandb

    rows, summary = report["rows"], report["summary"]
    if rows:
        experiment.log({"ood/metrics": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
    if summary:
        cols = list(dict.fromkeys(k for r in summary for k in r))
        experiment.log({"ood/summary": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in summary])})
    if diagnostics:
        experiment.log({"ood/diagnostics": wandb.Table(columns=list(diagnostics[0]),
                                                       data=[list(d.values()) for d in diagnostics])})
    for row in rows:
        if row["dataset"].endswith("_mean") or row["dataset"] == UNION:
            for m in METRIC_NAMES:
                experiment.summary[f"ood/{row['detector']}/{row['dataset']}/{m}"] = row[m]
    for name, path in report["images"].items():
        experiment.log({f"ood/plots/{name}": wandb.Image(path)})
