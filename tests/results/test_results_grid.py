"""Grid runner: finished runs are skipped, an interrupted run resumes from its last checkpoint, a changed config is
refused in an existing grid directory; commands and W&B sweep files for spreading a grid over machines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_methods import ImageClassifier
from lightning_methods.results import grid
from lightning_methods.results.record import read_metrics_csv
from lightning_methods.results.table import main as table_main
from lightning_methods.runs import ConfigMismatchError

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "configs/quickstart.yaml"


def write_config(path: Path, lr: float = 0.05, logger: bool = False) -> str:
    cfg = yaml.safe_load(QUICK.read_text())
    cfg["trainer"].update(max_epochs=2, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                          num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                          accelerator="cpu")
    if not logger:
        cfg["trainer"]["logger"] = False
    cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] = lr
    cfg["data"]["init_args"]["batch_size"] = 32
    cfg["test_after_fit"] = "last"
    path.write_text("# paper: test/acc=97.5 (made-up number for the test)\n" + yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def test_grid_skips_finished_runs_resumes_an_interrupted_one_and_refuses_a_changed_config(tmp_path, monkeypatch,
                                                                                         one_thread):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "digits.yaml")
    args = ["--config", config, "--seeds", "0", "1", "2", "--grid_dir", str(tmp_path / "grid")]
    step = ImageClassifier.training_step

    def crash_in_seed1_epoch1(self, batch, batch_idx):
        if self.trainer.default_root_dir.endswith("seed1") and self.global_step == 2:
            raise RuntimeError("simulated kill")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ImageClassifier, "training_step", crash_in_seed1_epoch1)
    with pytest.raises(RuntimeError, match="seed1 failed"):
        grid.main(args)
    runs = tmp_path / "grid/digits"
    assert json.loads((runs / "seed0/results.json").read_text())["status"] == "finished"
    assert json.loads((runs / "seed1/results.json").read_text())["status"] == "failed"
    assert (runs / "seed1/checkpoints/last.ckpt").is_file() and not (runs / "seed2/results.json").exists()
    seed0_written = (runs / "seed0/results.json").stat().st_mtime_ns

    monkeypatch.setattr(ImageClassifier, "training_step", step)
    records = grid.main(args)
    assert [r["info"]["seed"] for r in records] == [0, 1, 2] and all(r["status"] == "finished" for r in records)
    assert (runs / "seed0/results.json").stat().st_mtime_ns == seed0_written  # skipped, not rerun
    resumed = records[1]
    assert resumed["resumed_from"].endswith("seed1/checkpoints/last.ckpt") and resumed["global_step"] == 4
    assert [row["epoch"] for row in read_metrics_csv(runs / "seed1/metrics.csv")] == [0, 1]
    assert records[2]["resumed_from"] is None and records[0]["config"]["seed_everything"] == 0
    assert [r["config"]["data"]["init_args"]["seed"] for r in records] == [0, 1, 2]
    state = json.loads((runs / "state.json").read_text())
    assert sorted(state["stages"]) == ["seed0", "seed1", "seed2"]

    # more seeds may be added later; a changed config or other fit arguments are refused before anything runs
    assert grid.main([*args[:-3], "3", *args[-2:], "--mode", "commands"]) == []
    assert (tmp_path / "grid/commands.txt").read_text() == f"lightning-methods grid --run {runs / 'seed3'}\n"
    assert grid.main(["--run", str(runs / "seed0")])[0]["status"] == "finished"  # finished: nothing reruns
    write_config(tmp_path / "digits.yaml", lr=0.1)
    with pytest.raises(ConfigMismatchError, match=r"model\.init_args\.optimizer\.init_args\.lr"):
        grid.main(args)
    write_config(tmp_path / "digits.yaml")
    with pytest.raises(ConfigMismatchError, match=r"trainer\.max_epochs"):
        grid.main([*args, "--", "--trainer.max_epochs=3"])
    assert (runs / "seed0/results.json").stat().st_mtime_ns == seed0_written

    # the table of the grid: mean and std of the three seeds, as numpy computes them
    table = table_main([str(tmp_path / "grid"), "--output", str(tmp_path / "table"), "--metrics", "test/acc"])
    accs = np.array([r["metrics"]["test/acc"] for r in records]) * 100
    row = table.rows[0]
    assert row.n == 3 and row.stats["test/acc"] == pytest.approx((accs.mean(), accs.std(ddof=1)))
    assert row.paper == {"test/acc": 97.5}
    assert (tmp_path / "table/table.md").is_file() and (tmp_path / "table/curves.png").is_file()


def test_commands_and_sweep_modes_prepare_every_combination(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "digits_wandb.yaml", logger=True)
    sets = ["--set", "model.init_args.label_smoothing=0.0,0.1", "--set", "data.init_args.augment=none,crop"]
    grid.main(["--config", config, "--seeds", "0", "1", *sets, "--grid_dir", str(tmp_path / "g"), "--mode",
               "commands"])
    commands = (tmp_path / "g/commands.txt").read_text().splitlines()
    assert len(commands) == 8
    run = tmp_path / "g/digits_wandb/label_smoothing=0.1,augment=crop/seed1"
    assert f"lightning-methods grid --run {run}" in commands
    cfg = yaml.safe_load((run / "run.yaml").read_text())
    assert cfg["model"]["init_args"]["label_smoothing"] == 0.1 and cfg["data"]["init_args"]["augment"] == "crop"
    assert cfg["seed_everything"] == 1 and cfg["data"]["init_args"]["seed"] == 1
    assert cfg["checkpoint"]["dirpath"] == str(run / "checkpoints") and cfg["trainer"]["default_root_dir"] == str(run)
    wandb = cfg["trainer"]["logger"]["init_args"]
    state = json.loads((tmp_path / "g/digits_wandb/state.json").read_text())
    assert wandb["id"] == state["wandb_ids"]["label_smoothing=0.1,augment=crop/seed1"] and wandb["resume"] == "allow"
    assert wandb["group"] == "digits_wandb-label_smoothing=0.1,augment=crop" and wandb["save_dir"] == str(run)
    assert cfg["results"]["info"]["combination"] == {"model.init_args.label_smoothing": "0.1",
                                                      "data.init_args.augment": "crop"}

    with pytest.raises(KeyError, match="did you mean model.init_args.label_smoothing"):
        grid.main(["--config", config, "--set", "model.init_args.label_smothing=0.1", "--grid_dir",
                   str(tmp_path / "h"), "--mode", "commands"])

    grid.main(["--config", config, "--seeds", "0", "1", "2", *sets, "--grid_dir", str(tmp_path / "s"), "--mode",
               "sweep", "--", "--trainer.max_epochs=3"])
    sweep = yaml.safe_load((tmp_path / "s/digits_wandb/sweep.yaml").read_text())
    assert sweep["method"] == "grid" and sweep["metric"] == {"name": "val/acc", "goal": "maximize"}
    assert sweep["parameters"] == {"seed_everything": {"values": [0, 1, 2]},
                                   "model.init_args.label_smoothing": {"values": [0.0, 0.1]},
                                   "data.init_args.augment": {"values": ["none", "crop"]}}
    assert sweep["command"] == ["lightning-methods", "fit", "--config", str(Path(config).resolve()),
                                "--trainer.max_epochs=3", "${args}"]


def test_set_reaches_a_callbacks_argument_as_the_command_line_does(tmp_path, monkeypatch):
    """A key through a list names its last entry, as `--trainer.callbacks.init_args.X` does on the fit command line:
    EMQ's prune rate (a callback argument) can be swept; a key that only an earlier entry has is refused with that
    rule in the message."""
    monkeypatch.chdir(tmp_path)
    emq = str(REPO / "configs/quantization/digits_emq.yaml")
    grid.main(["--config", emq, "--seeds", "0", "--set", "trainer.callbacks.init_args.prune_rate=0.5,0.6",
               "--grid_dir", str(tmp_path / "g"), "--mode", "commands"])
    for rate in (0.5, 0.6):
        cfg = yaml.safe_load((tmp_path / f"g/digits_emq/prune_rate={rate}/seed0/run.yaml").read_text())
        callback = cfg["trainer"]["callbacks"][-1]
        assert callback["class_path"].endswith("BitwiseCoresetCallback") and callback["init_args"]["prune_rate"] == rate
    two = tmp_path / "two_callbacks.yaml"
    two.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "val/acc"}},
        {"class_path": "lightning_methods.callbacks.BitwiseCoresetCallback", "init_args": {"prune_rate": 0.5}}]}}))
    with pytest.raises(KeyError, match=r"trainer.callbacks.init_args.monitor: .*names its last entry"):
        grid.main(["--config", emq, "--set", "trainer.callbacks.init_args.monitor=val/loss", "--grid_dir",
                   str(tmp_path / "h"), "--mode", "commands", "--", "--config", str(two)])
