"""The per-layer tunnel table (Masarczyk et al., *The Tunnel Effect*, NeurIPS 2023, arXiv 2305.19753) as files a
person can read (CSV, JSON) and as W&B entries.

One row per probe point in forward order: ``layer`` (1-based), ``name``, ``module``, ``dim`` (probed features),
``acc_id`` (probe test accuracy), ``train_acc_id``, ``acc_ood`` / ``train_acc_ood`` (empty without an OOD probe),
``rank`` (numerical rank of the test representations), ``rank_per_class`` (rank / number of ID classes) and
``in_tunnel``. The summary holds the tunnel start (with its definition), the elbow, the OOD peak and retention, the
recipe (pooling, samples, dtype, probe and rank settings) and timings.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_methods.utils import atomic_write_json, atomic_write_text

COLUMNS = ["layer", "name", "module", "dim", "acc_id", "train_acc_id", "acc_ood", "train_acc_ood", "rank",
           "rank_per_class", "in_tunnel"]
HISTORY_COLUMNS = ["epoch", "global_step", "layer", "name", "acc_id", "acc_ood", "rank", "rank_per_class",
                   "in_tunnel", "tunnel_start_layer"]


@dataclass
class TunnelReport:
    """Rows (one dict per layer, keys :data:`COLUMNS`) and a summary dict (JSON-safe)."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    def column(self, key: str) -> list[Any]:
        return [r[key] for r in self.rows]

    def table_data(self) -> list[list[Any]]:
        return [["" if r.get(c) is None else r.get(c) for c in COLUMNS] for r in self.rows]

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows([[_fmt(v) for v in row] for row in self.table_data()])
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "summary": self.summary}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunnelReport:
        return cls([dict(r) for r in data["rows"]], dict(data.get("summary", {})))

    def save(self, directory: str | Path, stem: str = "tunnel") -> dict[str, Path]:
        """Write ``<stem>.csv`` and ``<stem>.json`` (atomically) into ``directory``; returns the paths."""
        d = Path(directory)
        return {"csv": atomic_write_text(d / f"{stem}.csv", self.to_csv()),
                "json": atomic_write_json(d / f"{stem}.json", self.to_dict())}

    def describe(self) -> str:
        """A short human-readable summary line."""
        s = self.summary
        start = s.get("tunnel_start_layer")
        txt = (f"tunnel starts at layer {start} ({s.get('tunnel_start_name')}) of {len(self.rows)}; "
               f"{s.get('definition', '')}")
        if s.get("ood_peak_layer") is not None:
            txt += (f"; OOD accuracy peaks at layer {s['ood_peak_layer']}, last layer keeps "
                    f"{s['ood_retained_pct']:.1f}% ({s['tunnel_strength']} tunnel)")
        return txt


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def history_csv(history: Sequence[dict[str, Any]]) -> str:
    """Long-format CSV of periodic probes: one line per (epoch, layer)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for entry in history:
        rep = TunnelReport.from_dict(entry["report"])
        for r in rep.rows:
            writer.writerow([_fmt(x) for x in (entry["epoch"], entry["global_step"], r["layer"], r["name"],
                                               r["acc_id"], r.get("acc_ood"), r["rank"], r["rank_per_class"],
                                               r["in_tunnel"], rep.summary.get("tunnel_start_layer"))])
    return buf.getvalue()


def wandb_log(run: Any, report: TunnelReport, step: int | None = None, images: dict[str, Path] | None = None,
              prefix: str = "tunnel") -> None:
    """Log the table, the tunnel start and the plots (``{key: png path}``) into a W&B run (``wandb.Run`` or the
    ``experiment`` of a ``WandbLogger``)."""
    import wandb

    payload: dict[str, Any] = {f"{prefix}/table": wandb.Table(columns=COLUMNS, data=report.table_data())}
    for key in ("tunnel_start_layer", "tunnel_length", "elbow_layer", "ood_peak_layer", "ood_retained_pct"):
        if report.summary.get(key) is not None:
            payload[f"{prefix}/{key}"] = report.summary[key]
    for key, path in (images or {}).items():
        payload[f"{prefix}/{key}"] = wandb.Image(str(path))
    if step is not None:  # as WandbLogger.log_metrics does: the step is a metric, W&B keeps its own counter
        payload["trainer/global_step"] = step
    run.log(payload)
    run.summary.update({f"{prefix}/summary": json.loads(json.dumps(report.summary, default=str))})
