"""Run records of a SAM-ON rho grid on disk, shared by the table tests."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_methods.results.record import FORMAT, metrics_csv_text

RHO_ACC = {0.5: [0.7712, 0.7691, 0.7745], 1.0: [0.7803, 0.7788, 0.7831, 0.7769]}


def write_run(root: Path, name: str, config_file: Path, rho: float, seed: int, acc: float, status="finished") -> None:
    run = root / name
    run.mkdir(parents=True)
    config = {"seed_everything": seed, "trainer": {"max_epochs": 2, "logger": {"init_args": {"name": name}}},
              "model": {"init_args": {"optimizer": {"init_args": {"rho": rho, "lr": 0.1}}}},
              "data": {"init_args": {"seed": seed, "data_dir": f"/data/{seed}"}}}
    history = [{"epoch": 0, "val/acc": acc - 0.1, "step": 10}, {"epoch": 1, "val/acc": acc, "step": 20}]
    record = {"format": FORMAT, "command": "fit", "status": status, "config": config, "seed": seed,
              "config_path": str(config_file), "run_dir": str(run),
              "metrics": {"test/acc": acc, "best/val/acc": acc + 0.01, "test/loss": 1.0 - acc}}
    (run / "results.json").write_text(json.dumps(record))
    (run / "metrics.csv").write_text(metrics_csv_text(history))


def write_rho_grid(runs: Path, config_file: Path) -> None:
    """Every run of :data:`RHO_ACC` (rho 0.5: 3 seeds, rho 1.0: 4 seeds) under ``runs``."""
    for rho, accs in RHO_ACC.items():
        for seed, acc in enumerate(accs):
            write_run(runs, f"rho{rho}-s{seed}", config_file, rho, seed, acc)
