"""Per-layer probe accuracy and numerical rank of the tunnel demo runs, mean +- std over seeds (from each run's
``tunnel/tunnel.csv``), and the model's own test accuracy (``results.json``).

    python scripts/demos/tunnel_summary.py runs/demos/tunnel
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path


def _ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def main(root: str) -> None:
    runs = sorted(Path(root).rglob("tunnel/tunnel.csv"))
    if not runs:
        sys.exit(f"no tunnel/tunnel.csv under {root}")
    tables = [list(csv.DictReader(p.open())) for p in runs]
    model_acc = []
    for p in runs:
        record = p.parent.parent / "results.json"
        if record.is_file():
            model_acc.append(json.loads(record.read_text())["metrics"]["test/acc"])
    print(f"{len(runs)} runs; model test accuracy {_ms(model_acc, 100)} %\n")
    print("| layer | name | probe test acc (%) | rank |")
    print("|---|---|---|---|")
    for i, row in enumerate(tables[0]):
        acc = [float(t[i]["acc_id"]) for t in tables]
        rank = [float(t[i]["rank"]) for t in tables]
        print(f"| {row['layer']} | {row['name']} | {_ms(acc, 100)} | {_ms(rank, 1.0, 1)} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demos/tunnel")
