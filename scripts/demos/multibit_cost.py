"""Training cost of the multibit demo runs: samples through the network (training + coreset scoring, summed over
bit-widths) and measured time, mean +- std over seeds per config, from each run's ``multibit_cost.json``.

    python scripts/demos/multibit_cost.py runs/demos/multibit
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(root: str) -> None:
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for path in sorted(Path(root).rglob("multibit_cost.json")):
        run_dir = path.parent.parent
        record = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
        name = Path(record.get("config_path") or "?").stem
        cost = json.loads(path.read_text())
        rows[name].append((float(sum(cost["total_samples"].values())), float(cost["total_time_s"])))
    if not rows:
        sys.exit(f"no multibit_cost.json under {root}")
    base = statistics.mean(s for s, _ in rows.get("digits_anyprecision", [(float("nan"), 0.0)]))
    print(
        "| config | runs | samples (train + scoring, all bit-widths) | relative to Any-Precision | time in training "
        "and scoring (s) |"
    )
    print("|---|---|---|---|---|")
    for name, values in sorted(rows.items()):
        samples, times = [s for s, _ in values], [t for _, t in values]
        sd = statistics.stdev(times) if len(times) > 1 else 0.0
        print(
            f"| {name} | {len(values)} | {statistics.mean(samples):.0f} | {statistics.mean(samples) / base:.2f} | "
            f"{statistics.mean(times):.1f} +- {sd:.1f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demos/multibit")
