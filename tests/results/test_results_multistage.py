"""`lightning-methods table` reads the results of the multi-stage commands: federated runs (one results.json per
algorithm) and Early Cutting runs (summary.json), grouped over seeds, with the paper's numbers of the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightning_methods.federated.cli import run as fed_run
from lightning_methods.results.record import find_records
from lightning_methods.results.table import main as table_main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.filterwarnings("ignore:.*cover only")
def test_federated_runs_over_two_seeds_make_one_row_per_algorithm(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # the config's W&B save_dir is relative
    config = tmp_path / "digits_demo.yaml"
    config.write_text("# paper: final_mean=52.91 (a number for the test)\n"
                      + (REPO / "configs/federated/digits_demo.yaml").read_text())
    finals: dict[str, list[float]] = {"FedFree": [], "Local": []}
    for seed in (0, 1):
        summaries = fed_run(["--config", str(config), "--run_dir", str(tmp_path / f"s{seed}"), "--progress", "false",
                             "--data.partition.num_clients", "2", "--data.seed", str(seed),
                             "--federation.rounds", "1",
                             "--compare_with", json.dumps([{"class_path": "lightning_methods.federated.LocalOnly"}]),
                             "--trainer", json.dumps({"accelerator": "cpu", "devices": 1, "precision": "32-true",
                                                      "limit_train_batches": 2})])
        for summary in summaries:
            finals["FedFree" if summary["algorithm"].lower() == "fedfree" else "Local"].append(summary["final_mean"])
    records = find_records([tmp_path])
    assert len(records) == 4 and {r["seed"] for r in records} == {0, 1}
    assert all(r["config_path"] == [str(config)] for r in records)

    table = table_main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--no_plot", "--output", str(tmp_path / "out")])
    rows = {row.label.split(":")[-1].lower(): row for row in table.rows}
    assert set(rows) == {"fedfree", "local"}
    for name, row in rows.items():
        values = 100 * np.array(finals["FedFree" if name == "fedfree" else "Local"])
        assert row.n == 2 and sorted(row.seeds) == [0, 1]
        assert row.stats["final_mean"] == pytest.approx((values.mean(), values.std(ddof=1)), rel=1e-12)
    assert rows["fedfree"].paper == {"final_mean": 52.91}
    assert rows["local"].paper == {}  # the config's number is FedFree's, not the baseline's run beside it


def write_selection_run(root: Path, config: Path, seed: int, accs: tuple[float, float, float], status="done") -> None:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"seed_everything: {seed}\nrun_dir: {root}\nselection:\n  keep_rate: 0.7\n")
    summary = {"status": status, "rounds": {"0": {"status": "done"}}, "final": {},
               "test_acc_last": accs[0], "test_acc_at_best_val": accs[1],
               "test_acc_max_over_all_epochs_and_rounds": accs[2], "source": {"config": [str(config)], "seed": seed}}
    (root / "summary.json").write_text(json.dumps(summary))


def test_early_cutting_summaries_group_over_seeds_beside_the_paper(tmp_path, capsys):
    config = tmp_path / "cifar100_sym40.yaml"
    config.write_text("# paper: test_acc_max_over_all_epochs_and_rounds=75.03 (secondary)\nseed_everything: 1\n")
    runs = {0: (0.70, 0.71, 0.74), 1: (0.72, 0.73, 0.76), 2: (0.71, 0.70, 0.75)}
    for seed, accs in runs.items():
        write_selection_run(tmp_path / "runs" / f"s{seed}", config, seed, accs)
    write_selection_run(tmp_path / "runs" / "ended", config, 3, (0.1, 0.1, 0.1), status="threshold_not_reached")
    table = table_main([str(tmp_path / "runs"), "--no_plot", "--output", str(tmp_path / "out")])
    (row,) = table.rows
    best = 100 * np.array([a[2] for a in runs.values()])
    assert row.n == 3 and row.label == "cifar100_sym40"
    assert row.stats["test_acc_max_over_all_epochs_and_rounds"] == pytest.approx((best.mean(), best.std(ddof=1)))
    assert row.paper == {"test_acc_max_over_all_epochs_and_rounds": 75.03}
    assert "left out 1 runs" in capsys.readouterr().err  # the run that stopped before its final round


def test_fed_grid_rows_are_named_by_config_and_set_values(tmp_path):
    """A `grid --command fed --set federation.lr=0.05,0.1` writes GRID/<config>/lr=<v>/seed<k>/fed/<algorithm>/
    results.json (each run's command read the grid's run.yaml): its rows are named as fit grid rows are, the config
    name plus the --set values (docs/results.md), so `--baseline digits_demo:local lr=0.05` finds its row."""
    config_dir = tmp_path / "grid" / "digits_demo"
    config_dir.mkdir(parents=True)
    (config_dir / "state.json").write_text(json.dumps({"kind": "grid", "fingerprint": {
        "config": {}, "swept": ["federation.lr"], "seed_keys": ["data.seed", "federation.seed"]}, "stages": {}}))
    finals = {}
    for lr in (0.05, 0.1):
        for seed in (0, 1):
            run_dir = config_dir / f"lr={lr}" / f"seed{seed}"
            run_dir.mkdir(parents=True)
            resolved = {"data": {"seed": seed}, "federation": {"lr": lr, "seed": seed}}
            (run_dir / "run.yaml").write_text("# command: fed\n" + json.dumps(resolved))
            for k, algorithm in enumerate(("fedfree", "local")):
                out = run_dir / "fed" / algorithm
                out.mkdir(parents=True)
                (out / "config.yaml").write_text(json.dumps({**resolved, "run_dir": str(run_dir / "fed")}))
                final = 0.25 * k + lr + 0.01 * seed
                finals.setdefault((lr, algorithm), []).append(final)
                summary = {"algorithm": algorithm, "rounds": 1, "final_mean": final}
                (out / "results.json").write_text(json.dumps({"summary": summary, "clients": [], "source": {
                    "config": [str(run_dir / "run.yaml")], "seed": seed, "algorithm": "fedfree"}}))
    table = table_main([str(tmp_path / "grid"), "--metrics", "final_mean", "--no_plot", "--baseline",
                        "digits_demo:local lr=0.05"])
    rows = {row.name: row for row in table.rows}
    assert set(rows) == {f"digits_demo:{a} lr={lr}" for lr in (0.05, 0.1) for a in ("fedfree", "local")}
    for (lr, algorithm), values in finals.items():
        row = rows[f"digits_demo:{algorithm} lr={lr}"]
        assert row.n == 2 and sorted(row.seeds) == [0, 1]
        assert row.stats["final_mean"] == pytest.approx((100 * np.mean(values), 100 * np.std(values, ddof=1)),
                                                        rel=1e-12)
    assert {c.row for c in table.comparisons} == set(rows) - {"digits_demo:local lr=0.05"}
