"""Training cost of the multibit demo runs, from each run's ``multibit_cost.json``: samples trained (forward +
backward) and samples scored (forward only, coreset refreshes), summed over bit-widths, against the Any-Precision
cost of the same run length (every epoch on the full data: epochs x the samples of a full-data warm-up epoch; exact
for ``digits_anyprecision.yaml`` itself), and the measured time in training and scoring (mean +- std over runs).

    python scripts/demos/multibit_cost.py runs/demos/multibit
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _kind(epoch: dict, kind: str) -> int:
    return sum(int(v) for v in epoch["samples_by_kind"][kind].values())


def main(root: str) -> None:
    rows: dict[str, list[tuple[int, int, int, float]]] = defaultdict(list)
    for path in sorted(Path(root).rglob("multibit_cost.json")):
        run_dir = path.parent.parent
        record = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
        if record.get("status") != "finished":
            continue
        name = (record.get("info") or {}).get("name") or Path(record.get("config_path") or "?").stem
        cost = json.loads(path.read_text())
        epochs = cost["epochs"]
        train = sum(_kind(e, "train") for e in epochs)
        score = sum(_kind(e, "score") for e in epochs)
        full = len(epochs) * _kind(epochs[0], "train")  # epoch 0 is a full-data epoch (warm-up or Any-Precision)
        rows[name].append((train, score, full, float(cost["total_time_s"])))
    if not rows:
        sys.exit(f"no finished run with a multibit_cost.json under {root}")
    print(
        "| config | runs | samples trained | samples scored | trained / Any-Precision | time in training and "
        "scoring (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name, values in sorted(rows.items()):
        train, score, full, times = (statistics.mean(v[i] for v in values) for i in range(4))
        t = [v[3] for v in values]
        sd = statistics.stdev(t) if len(t) > 1 else 0.0
        print(f"| {name} | {len(values)} | {train:.0f} | {score:.0f} | {train / full:.2f} | {times:.0f} +- {sd:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demos/multibit")
