"""`lightning-methods table`: grouping by configuration, mean and std equal to numpy's, the paper's numbers beside
ours, unfinished and foreign results left out, W&B projects as input (API faked: tests are offline)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from results_testing import RHO_ACC, write_rho_grid, write_run

from lightning_methods.results import aggregate
from lightning_methods.results.table import main as table_main


def test_table_mean_and_std_equal_numpy_per_configuration(tmp_path, capsys):
    cfg = tmp_path / "cifar100_wrn28_10_samon.yaml"
    cfg.write_text("# SAM-ON\n# paper: top1=84.2 (teaser figure)\nseed_everything: 0\n")
    runs = tmp_path / "runs"
    write_rho_grid(runs, cfg)
    write_run(runs, "crashed", cfg, 0.5, 9, 0.01, status="failed")
    (runs / "federated").mkdir()
    (runs / "federated/results.json").write_text(json.dumps({"summary": {"acc": 1.0}}))  # another tool's format

    table = table_main([str(runs), "--metrics", "test/acc", "test/loss", "--output", str(tmp_path / "out")])
    rows = {row.setting: row for row in table.rows}
    assert set(rows) == {"rho=0.5", "rho=1.0"}
    for rho, accs in RHO_ACC.items():
        row, values = rows[f"rho={rho}"], np.array(accs)
        assert row.n == len(accs) and row.label == "cifar100_wrn28_10_samon" and sorted(row.seeds) == list(
            range(len(accs)))
        assert row.stats["test/acc"] == pytest.approx((100 * values.mean(), 100 * values.std(ddof=1)), rel=1e-12)
        assert row.stats["test/loss"] == pytest.approx(((1 - values).mean(), (1 - values).std(ddof=1)), rel=1e-12)
        assert row.paper == {"test/acc": 84.2}
    out = capsys.readouterr()
    assert "left out 1 runs" in out.err
    assert "| Config | n | test/acc | test/loss | Paper: test/acc |" in out.out
    line = next(x for x in out.out.splitlines() if "rho=1.0" in x)
    mean, std = 100 * np.mean(RHO_ACC[1.0]), 100 * np.std(RHO_ACC[1.0], ddof=1)
    assert f"| {mean:.2f} ± {std:.2f} |" in line and line.endswith("| 84.2 |")
    with open(tmp_path / "out/table.csv") as f:
        saved = {r["setting"]: r for r in csv.DictReader(f)}
    assert float(saved["rho=0.5"]["test/acc mean"]) == pytest.approx(100 * np.mean(RHO_ACC[0.5]), rel=1e-5)
    assert (tmp_path / "out/curves.png").stat().st_size > 1000

    # population std on request; a failed run only with --include_unfinished
    table = table_main([str(runs), "--metrics", "test/acc", "--ddof", "0", "--include_unfinished", "--no_plot",
                        "--output", str(tmp_path / "out2")])
    row = next(r for r in table.rows if r.setting == "rho=0.5")
    values = np.array([*RHO_ACC[0.5], 0.01])
    assert row.n == 4 and row.stats["test/acc"] == pytest.approx((100 * values.mean(), 100 * values.std()))


def test_curves_average_the_seeds_per_epoch(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed_everything: 0\n")
    for seed, acc in enumerate(RHO_ACC[1.0]):
        write_run(tmp_path, f"s{seed}", cfg, 1.0, seed, acc)
    (row,) = aggregate.group_runs([json.loads(p.read_text()) for p in sorted(tmp_path.glob("s*/results.json"))])
    epochs, mean, std = aggregate.curves(row, "val/acc")
    accs = np.array(RHO_ACC[1.0])
    assert list(epochs) == [0, 1] and mean == pytest.approx([100 * (accs - 0.1).mean(), 100 * accs.mean()])
    assert std == pytest.approx([100 * (accs - 0.1).std(ddof=1), 100 * accs.std(ddof=1)])
    _, _, population = aggregate.curves(row, "val/acc", ddof=0)  # table --ddof 0 draws its band the same way
    assert population == pytest.approx([100 * (accs - 0.1).std(ddof=0), 100 * accs.std(ddof=0)])


def test_paper_numbers_are_read_from_the_config_header_only(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# Title (arXiv 2306.04226)\n# paper: top1=84.2, top5=97.0 (Table 1, 200 epochs, rho 1.0)\n#\n"
                   "#   paper: best/val/acc=85.1\n\nmodel: {}\n# paper: test/acc=1.0\n")
    assert aggregate.paper_numbers(cfg) == {"test/acc": 84.2, "test/acc_top5": 97.0, "best/val/acc": 85.1}
    assert aggregate.paper_numbers(tmp_path / "missing.yaml") == {}


def test_wandb_project_as_input(tmp_path, monkeypatch):
    import wandb

    def fake_run(i: int, rho: float, acc: float, state: str = "finished") -> SimpleNamespace:
        config = {"config": [str(tmp_path / "samon.yaml")], "seed_everything": i,
                  "model": {"init_args": {"optimizer": {"init_args": {"rho": rho}}}},
                  "results": {"info": {"name": "samon", "combination": {"model.init_args.optimizer.init_args.rho":
                                                                          str(rho)}, "seed": i}}}
        history = [{"epoch": 0, "val/acc": acc / 2, "_step": 0}, {"epoch": 1, "val/acc": acc, "_step": 1}]
        return SimpleNamespace(id=f"r{i}", name=f"r{i}", group="g", state=state, config=config,
                               summary={"test/acc": acc, "best/val/acc": acc, "_runtime": 3, "val/acc": {"max": acc}},
                               scan_history=lambda h=history: iter(h))

    runs = [fake_run(0, 1.0, 0.70), fake_run(1, 1.0, 0.74), fake_run(2, 1.0, 0.75), fake_run(3, 1.0, 0.1, "crashed")]
    calls = []

    class FakeApi:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            return runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    (tmp_path / "samon.yaml").write_text("# paper: test/acc=84.2\n")
    table = table_main(["wandb:me/lightning-methods", "--filter", "group=g", "--filter", "seed_everything=1",
                        "--metrics", "test/acc", "--output", str(tmp_path)])
    assert calls == [("me/lightning-methods", {"group": "g", "config.seed_everything": "1"})]
    (row,) = table.rows
    accs = np.array([0.70, 0.74, 0.75])
    assert row.name == "samon" and row.n == 3 and row.paper == {"test/acc": 84.2}
    assert row.stats["test/acc"] == pytest.approx((100 * accs.mean(), 100 * accs.std(ddof=1)))
    assert aggregate.curves(row, "val/acc")[1] == pytest.approx([50 * accs.mean(), 100 * accs.mean()])


def test_table_and_curves_go_to_a_wandb_run_when_asked(tmp_path, monkeypatch):
    """``--wandb_project P --wandb_mode offline``: the table's rows, the baseline comparison and the curves picture
    are logged into a new (offline) W&B run ``table-<output folder>`` whose files hold them, with the values of
    table.csv / baseline.csv; without the option nothing goes to W&B."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed_everything: 0\n")
    write_rho_grid(tmp_path / "runs", cfg)
    out = tmp_path / "out"
    table = table_main([str(tmp_path / "runs"), "--output", str(out), "--metrics", "test/acc", "--baseline",
                        "rho=0.5", "--wandb_project", "p", "--wandb_mode", "offline"])
    files = next(out.glob("wandb/offline-run-*/files"))
    images = list(files.glob("media/images/table/curves_*.png"))
    assert len(images) == 1 and images[0].stat().st_size > 1000
    (rows_file,) = files.glob("media/table/table/rows_*.table.json")
    logged = json.loads(rows_file.read_text())
    with open(out / "table.csv") as f:
        saved = list(csv.reader(f))
    assert logged["columns"] == saved[0] and [[str(v) for v in r] for r in logged["data"]] == saved[1:]
    (baseline_file,) = files.glob("media/table/table/baseline_*.table.json")
    logged = json.loads(baseline_file.read_text())
    (c,) = table.comparisons
    row = dict(zip(logged["columns"], logged["data"][0], strict=True))
    assert row["config"] == c.row and row["apart"] == 1 and float(row["diff"]) == pytest.approx(c.diff, rel=1e-5)
    table_main([str(tmp_path / "runs"), "--output", str(tmp_path / "plain")])
    assert not (tmp_path / "plain" / "wandb").exists()


def test_rows_of_two_grids_of_one_config_name_get_distinct_names():
    """Two grid directories of the same config name and ``--set`` values but other fit arguments (``-- --trainer.
    max_epochs N``): every row is named by its ``--set`` values and the other keys that differ, never twice alike."""
    def record(epochs: int, smoothing: float, seed: int) -> dict:
        return {"config": {"seed_everything": seed, "trainer": {"max_epochs": epochs},
                           "model": {"init_args": {"label_smoothing": smoothing}}}, "metrics": {"test/acc": 0.5},
                "info": {"name": "quickstart", "combination": {"model.init_args.label_smoothing": str(smoothing)},
                         "seed": seed}}

    rows = aggregate.group_runs([record(e, s, seed) for e in (1, 3) for s in (0.0, 0.1) for seed in (0, 1)])
    assert [(row.name, row.n) for row in rows] == [
        ("quickstart label_smoothing=0.0,max_epochs=1", 2), ("quickstart label_smoothing=0.1,max_epochs=1", 2),
        ("quickstart label_smoothing=0.0,max_epochs=3", 2), ("quickstart label_smoothing=0.1,max_epochs=3", 2)]
    one_grid = aggregate.group_runs([record(1, s, seed) for s in (0.0, 0.1) for seed in (0, 1)])
    assert [row.name for row in one_grid] == ["quickstart label_smoothing=0.0", "quickstart label_smoothing=0.1"]
    optimizers = [{"config": {"seed_everything": 0, "model": {"init_args": {"optimizer": {"class_path": name}}}},
                   "info": {"name": "q", "combination": {"model.init_args.optimizer": f"{{class_path: {name}}}"}},
                   "metrics": {}} for name in ("SGD", "Adam")]  # a --set value that is a whole class
    assert [row.name for row in aggregate.group_runs(optimizers)] == ["q optimizer={class_path: SGD}",
                                                                        "q optimizer={class_path: Adam}"]


def test_rows_that_differ_in_a_callbacks_argument_are_named_by_that_argument():
    """Configs differing inside a list of dicts (the callbacks) are named by the argument that differs, not by the
    whole list; a grid's --set through the list (its last entry) is not named twice."""
    def record(score_bn: str, seed: int, combination: dict | None = None) -> dict:
        callbacks = [{"class_path": "EarlyStopping", "init_args": {"patience": 3}},
                     {"class_path": "BitwiseCoresetCallback", "init_args": {"prune_rate": 0.5, "score_bn": score_bn}}]
        info = {"name": "digits_emq", "seed": seed, **({"combination": combination} if combination else {})}
        return {"config": {"seed_everything": seed, "trainer": {"callbacks": callbacks}}, "metrics": {},
                "info": info}

    rows = aggregate.group_runs([record(bn, seed) for bn in ("running", "recalibrated") for seed in (0, 1)])
    assert [(row.name, row.n) for row in rows] == [("digits_emq score_bn=running", 2),
                                                   ("digits_emq score_bn=recalibrated", 2)]
    swept = [record(bn, 0, {"trainer.callbacks.init_args.score_bn": bn}) for bn in ("running", "recalibrated")]
    assert [row.name for row in aggregate.group_runs(swept)] == ["digits_emq score_bn=running",
                                                                 "digits_emq score_bn=recalibrated"]


def test_left_out_records_are_named_by_their_file(tmp_path, capsys):
    """A ``test`` of a finished run's checkpoint (``results_test-last.json`` beside its ``results.json``) is left
    out of the table; the message names that file, not the run, whose fit is finished and tabulated."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed_everything: 0\n")
    write_run(tmp_path / "runs", "s0", cfg, 1.0, 0, 0.7)
    run = tmp_path / "runs/s0"
    evaluation = {**json.loads((run / "results.json").read_text()), "command": "test"}
    (run / "results_test-last.json").write_text(json.dumps(evaluation))
    (row,) = table_main([str(tmp_path / "runs"), "--no_plot", "--output", str(tmp_path)]).rows
    assert row.n == 1
    err = capsys.readouterr().err
    assert "left out 1 runs that are not finished fits" in err and str(run / "results_test-last.json") in err
