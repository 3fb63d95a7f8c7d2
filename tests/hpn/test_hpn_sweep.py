"""The t-sweep runner (python -m lightning_methods.hpn.sweep) on the shipped digits multi-task config: one stage per
t, results as CSV / JSON / PNG, finished t's never rerun, another configuration refused, one W&B run per t."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightning_methods.hpn.sweep import main
from lightning_methods.runs import ConfigMismatchError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "hpn" / "digits_multitask.yaml"
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--model.init_args.prototype_iterations=50"]


def test_sweep_runs_resumes_and_refuses_other_settings(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    results = main(["--config", str(CONFIG), "--task_weights", "0.25", "0.9", "--out", str(out), *FAST])
    assert set(results) == {"0.25", "0.9"}
    for row in results.values():
        assert 0 <= row["test/acc"] <= 1 and row["test/mae"] > 0 and "test/loss_c" in row
    printed = capsys.readouterr().out
    assert "test acc %" in printed and "54.5 / 64.1" in printed  # the table, with the paper's OmniArt row for 0.25
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["task_weight"] for r in rows] == ["0.25", "0.9"]
    assert float(rows[1]["test/mae"]) == pytest.approx(results["0.9"]["test/mae"])
    assert (out / "sweep.png").stat().st_size > 0
    state = json.loads((out / "state.json").read_text())
    assert set(state["stages"]) == {"t=0.25", "t=0.9"}
    assert "task_weight" not in json.dumps(state["fingerprint"])  # swept, so not part of the fingerprint
    for stage, run_id in state["wandb_ids"].items():  # each t logged into its own (offline) W&B run
        assert list((tmp_path / "runs" / "wandb").glob(f"offline-run-*-{run_id}")), stage
    assert (out / "t=0.9" / "checkpoints" / "last.ckpt").is_file()

    again = main(["--config", str(CONFIG), "--task_weights", "0.25", "0.9", "--out", str(out), *FAST])
    assert again == results and capsys.readouterr().out.count("finished earlier, skipped") == 2
    with pytest.raises(ConfigMismatchError, match="max_epochs"):
        main(["--config", str(CONFIG), "--task_weights", "0.25", "--out", str(out), *FAST,
              "--trainer.max_epochs=2"])
    with pytest.raises(SystemExit, match="one device"):
        main(["--config", str(CONFIG), "--out", str(tmp_path / "other"), "--trainer.devices=2"])
    with pytest.raises(ValueError, match="task_weight t must be in"):
        main(["--config", str(CONFIG), "--task_weights", "1.5", "--out", str(tmp_path / "other")])


def test_a_fit_resumes_from_its_own_checkpoint_although_training_set_its_hyperparameters(tmp_path, monkeypatch):
    """HPN writes values it derives while training into its hyperparameters (the regression bounds from the data, the
    prototypes' source), which LightningCLI copies into the config of a resume: the run's own checkpoint still
    resumes it (a killed sweep value resumes too), and it trains on to the longer schedule."""
    import torch

    from lightning_methods.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["fit", "--config", str(CONFIG), "--trainer.logger", "false", "--trainer.default_root_dir", "D",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--test_after_fit", "off"]
    cli_main([*args, "--trainer.max_epochs", "1"])
    last = tmp_path / "D/checkpoints/last.ckpt"
    hparams = torch.load(last, weights_only=True)["hyper_parameters"]
    assert hparams["bounds"] is not None  # derived from the data during the fit: the config said null
    cli_main([*args, "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_the_thread_count_is_recorded_per_t_and_a_resume_with_another_warns(tmp_path, monkeypatch, capsys, one_thread):
    """``--threads`` changes float round-off, not the settings: it stays out of the fingerprint (a resume with another
    count is not refused), each finished t records the count it ran with (stage record in state.json, ``threads`` in
    sweep.json), and a resume with another count prints a warning naming the t and both counts; the same count, or a
    t finished before counts were recorded, prints none."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    args = ["--config", str(CONFIG), "--task_weights", "0.5", "--out", str(out), *FAST, "--trainer.logger=false"]
    results = main([*args, "--threads", "1"])
    assert "threads" not in results["0.5"]  # the metrics alone
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["t=0.5"]["threads"] == 1 and "threads" not in json.dumps(state["fingerprint"])
    assert json.loads((out / "sweep.json").read_text())["threads"] == {"0.5": 1}
    capsys.readouterr()

    again = main([*args, "--threads", "2"])
    err = capsys.readouterr().err
    assert again == results and "warning: t=0.5 finished with 1 torch threads, this sweep runs with 2" in err
    assert json.loads((out / "sweep.json").read_text())["threads"] == {"0.5": 1}  # the count the t ran with
    main([*args, "--threads", "1"])
    assert "warning" not in capsys.readouterr().err

    del state["stages"]["t=0.5"]["threads"]  # a t finished by a version that did not record the count
    (out / "state.json").write_text(json.dumps(state))
    assert main([*args, "--threads", "2"]) == results
    assert "warning" not in capsys.readouterr().err
    assert json.loads((out / "sweep.json").read_text())["threads"] == {"0.5": None}


def test_an_interrupted_t_resumed_with_another_thread_count_warns_and_records_both(tmp_path, monkeypatch, capsys,
                                                                                      one_thread):
    """A t interrupted (Ctrl-C) after its first epoch with 2 threads and resumed with 1 from its last.ckpt warns before
    it goes on and records both counts in order; a finished t that ran partly with another count warns too."""
    from lightning_methods.hpn import HPNMultiTask

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    args = ["--config", str(CONFIG), "--task_weights", "0.5", "--out", str(out), *FAST, "--trainer.logger=false",
            "--trainer.max_epochs=2"]
    real = HPNMultiTask.on_train_epoch_start

    def ctrl_c(self):
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(HPNMultiTask, "on_train_epoch_start", ctrl_c)
    with pytest.raises((RuntimeError, SystemExit)):
        main([*args, "--threads", "2"])
    monkeypatch.setattr(HPNMultiTask, "on_train_epoch_start", real)
    assert json.loads((out / "t=0.5" / "threads.json").read_text()) == [2]
    assert "t=0.5" not in json.loads((out / "state.json").read_text()).get("stages", {})
    capsys.readouterr()

    main([*args, "--threads", "1"])
    err = capsys.readouterr().err
    assert "warning: t=0.5 was interrupted after running with 2 torch threads, this sweep runs with 1" in err
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["t=0.5"]["threads"] == [2, 1]
    assert json.loads((out / "sweep.json").read_text())["threads"] == {"0.5": [2, 1]}
    main([*args, "--threads", "1"])  # finished now: a t that ran partly with another count still warns
    assert "warning: t=0.5 finished with 2, then 1 torch threads, this sweep runs with 1" in capsys.readouterr().err


def test_a_t_killed_after_its_test_before_the_sweep_recorded_it_takes_its_results_from_its_record(
        tmp_path, monkeypatch, capsys, one_thread):
    """Killed between a t's finished fit + test and the sweep's record of it, the resumed sweep used to crash (the fit
    says the run has finished and returns nothing): it now takes the t's test metrics from its results.json. A t
    started again without a checkpoint to resume from has one part only (no warning about the earlier part)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    args = ["--config", str(CONFIG), "--task_weights", "0.5", "--out", str(out), *FAST, "--trainer.logger=false"]
    results = main([*args, "--threads", "2"])
    state_path = out / "state.json"
    state = json.loads(state_path.read_text())
    del state["stages"]["t=0.5"]  # the kill's window: the t's results.json says finished, state.json not yet
    state_path.write_text(json.dumps(state))
    again = main([*args, "--threads", "2"])
    assert again == results  # the same float32 metrics, through results.json
    assert "finished earlier" not in capsys.readouterr().out
    assert json.loads(state_path.read_text())["stages"]["t=0.5"]["threads"] == 2  # two parts, one count

    state = json.loads(state_path.read_text())
    del state["stages"]["t=0.5"]
    state_path.write_text(json.dumps(state))
    for ckpt in (out / "t=0.5" / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()  # nothing to resume: the earlier parts do not count
    (out / "t=0.5" / "results.json").unlink()
    main([*args, "--threads", "1"])
    assert "warning" not in capsys.readouterr().err
    assert json.loads(state_path.read_text())["stages"]["t=0.5"]["threads"] == 1
