"""The paper-style locality table from per-checkpoint records (pure functions; the command is ``cli.py``).

One row per condition (Baseline, Baseline+CutMix, ..., Modern) of "Inducing Spatial Locality in Vision Transformers
through the Training Protocol" (arXiv 2605.16390): minimum MAD over the heads of layer 0 and of the early layers
(mean +- sample std over the runs of the condition, i.e. over seeds), early-layer mean MAD and normalized entropy, and
test accuracy. MAD is shown in one normalisation (``norm``); the JSON output holds all of them (strict JSON: a value
that is not a number, e.g. the std of a single run, is ``null``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_methods.analysis.attention import early_layers, mad_scale, min_over_heads
from lightning_methods.utils import atomic_write_json, atomic_write_text
from lightning_methods.vit_locality.module import CONDITIONS

COLUMNS = (("min_mad_layer0", "min MAD L0"), ("min_mad_early", "min MAD early"), ("mean_mad_early", "mean MAD early"),
           ("mean_entropy_early", "entropy early"), ("test_acc", "test acc (%)"))


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf; e.g. the std of a single run) replaced by ``None``, so that
    ``json.dumps`` writes ``null`` (strict JSON readers reject ``NaN``); lists, tuples, dicts, numpy and torch values
    are converted recursively."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return strict_json(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def check_compatible(records: Sequence[dict[str, Any]]) -> None:
    """One table compares runs on one token grid and one dataset, probed the same way.

    Raises:
        ValueError: naming the checkpoints that differ (grid size, number of classes, probe settings).
    """
    if not records:
        raise ValueError("no checkpoints to tabulate")
    for key, what in (("grid", "token grids"), ("num_classes", "numbers of classes (datasets)"),
                      ("include_cls", "include_cls settings"), ("renormalize", "renormalize settings")):
        seen: dict[str, list[str]] = {}
        for r in records:
            seen.setdefault(str(r[key]), []).append(r["checkpoint"])
        if len(seen) > 1:
            detail = "; ".join(f"{value}: {', '.join(paths[:3])}" for value, paths in seen.items())
            raise ValueError(f"incompatible checkpoints in one locality table: different {what} ({detail}). "
                             "Tabulate each setting separately.")


def record_metrics(record: dict[str, Any], norm: str = "grid", max_early_layer: int = 2) -> dict[str, float]:
    """Summary numbers of one checkpoint: min MAD of layer 0 / of the early layers, early-layer mean MAD and
    entropy (MAD in the ``norm`` convention), test accuracy (NaN when not measured)."""
    mad = torch.tensor(record["mad_patch"], dtype=torch.float64) / mad_scale(norm, record["grid"])
    ent = torch.tensor(record["entropy"], dtype=torch.float64)
    early = early_layers(mad.shape[0], max_early_layer)
    acc = record.get("test_acc")
    return {"min_mad_layer0": min_over_heads(mad, 0), "min_mad_early": min_over_heads(mad, early),
            "mean_mad_early": float(mad[early].mean()), "mean_entropy_early": float(ent[early].mean()),
            "test_acc": float("nan") if acc is None else float(acc)}


def _order(name: str) -> tuple[int, str]:
    return (CONDITIONS.index(name), name) if name in CONDITIONS else (len(CONDITIONS), name)


def locality_table(records: Sequence[dict[str, Any]], norm: str = "grid",
                   max_early_layer: int = 2) -> list[dict[str, Any]]:
    """One row per condition (paper order, then other labels): ``runs`` and ``<metric>_mean`` / ``<metric>_std``
    (sample std, NaN for a single run) for every metric of :func:`record_metrics`."""
    check_compatible(records)
    groups: dict[str, list[dict[str, float]]] = {}
    for r in records:
        groups.setdefault(r["condition"], []).append(record_metrics(r, norm, max_early_layer))
    rows = []
    for name in sorted(groups, key=_order):
        values = groups[name]
        row: dict[str, Any] = {"condition": name, "runs": len(values)}
        for key, _ in COLUMNS:
            arr = np.array([v[key] for v in values], dtype=float)
            finite = arr[np.isfinite(arr)]
            row[f"{key}_mean"] = float(finite.mean()) if len(finite) else float("nan")
            row[f"{key}_std"] = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
        rows.append(row)
    return rows


def _cell(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if not np.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]], norm: str = "grid") -> str:
    """The table as Markdown (MAD with 3 decimals, entropy 3, accuracy 2)."""
    head = ["condition", "runs"] + [f"{label} ({norm})" if "MAD" in label else label for _, label in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["condition"], str(row["runs"])]
        cells += [_cell(row[f"{k}_mean"], row[f"{k}_std"], 2 if k == "test_acc" else 3) for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_report(records: Sequence[dict[str, Any]], out_dir: str | Path, norm: str = "grid",
                 max_early_layer: int = 2) -> tuple[list[dict[str, Any]], str]:
    """Write ``table.md``, ``table.csv``, ``per_checkpoint.csv``, ``locality.json`` (rows for every normalisation
    and the records) and ``mad_by_layer.png`` into ``out_dir``; returns the rows and the Markdown table."""
    from lightning_methods.analysis.attention_plots import plot_condition_curves

    out = Path(out_dir)
    rows = locality_table(records, norm, max_early_layer)
    md = markdown_table(rows, norm)
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.csv", _csv(rows))
    per = [{"condition": r["condition"], "checkpoint": r["checkpoint"], **record_metrics(r, norm, max_early_layer)}
           for r in records]
    atomic_write_text(out / "per_checkpoint.csv", _csv(per))
    norms = ("grid", "diag", "maxdist") if records[0]["grid"][0] == records[0]["grid"][1] else ("patch",)
    atomic_write_json(out / "locality.json", strict_json({
        "norm": norm, "max_early_layer": max_early_layer,
        "tables": {n: locality_table(records, n, max_early_layer) for n in norms}, "records": list(records)}))
    curves: dict[str, list] = {}
    for r in sorted(records, key=lambda r: _order(r["condition"])):
        mad = np.asarray(r["mad_patch"], dtype=float) / mad_scale(norm, r["grid"])
        curves.setdefault(r["condition"], []).append(mad.mean(1))
    plot_condition_curves(curves, out / "mad_by_layer.png", f"mean MAD over heads ({norm})")
    return rows, md
