"""The W&B run ids the package makes survive the YAML files and command lines that jsonargparse reads back. A 12-digit
hex id such as ``465101263e65`` (digits and one ``e``: about one id in 280) came back from a grid's ``run.yaml`` as a
number, quoted or not (jsonargparse reads a logger's init_args so), and stopped the run: the ids now start with a
letter."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lightning_methods.results import grid
from lightning_methods.runs import StagedRun

from helpers import interrupted_fit

REPO = Path(__file__).resolve().parents[2]
#: What a YAML 1.2 loader may read as a number: digits with an exponent and / or a dot, hex, octal.
NUMBER_LIKE = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d+)([eE][-+]?\d+)?|0[xXoO][0-9a-fA-F_]+")


def test_staged_run_ids_start_with_a_letter_and_are_unique(tmp_path):
    with StagedRun(tmp_path / "run", "t", {"config": "c"}) as run:
        ids = [run.wandb_id(f"s{i}") for i in range(300)]
        assert run.wandb_id("s7") == ids[7]  # kept: a resumed stage logs into the same W&B run
    assert all(i[0].isalpha() and len(i) == 12 and re.fullmatch(r"[a-z0-9]+", i) for i in ids)
    assert not any(NUMBER_LIKE.fullmatch(i) for i in ids) and len(set(ids)) == 300


def test_a_grid_run_file_parses_back_with_its_id(tmp_path, monkeypatch, capsys):
    """A grid's run.yaml is read back by ``fit`` with the W&B id kept in the grid's state."""
    from lightning_methods.cli import main

    def printed_id(grid_dir: Path) -> tuple[object, str]:
        grid.main(["--config", str(REPO / "configs/quickstart.yaml"), "--seeds", "0", "--grid_dir", str(grid_dir),
                   "--mode", "commands"])
        state = yaml.safe_load((grid_dir / "quickstart/state.json").read_text())
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", str(grid_dir / "quickstart/seed0/run.yaml"), "--print_config"])
        assert done.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        return printed["trainer"]["logger"]["init_args"]["id"], state["wandb_ids"]["seed0"]

    monkeypatch.chdir(tmp_path)
    got, kept = printed_id(tmp_path / "g")
    assert got == kept and kept[0].isalpha()


# ------------------------------------------------------------------------------------------------- fit runs (cli_runs)
def _wandb_config(**init_args) -> dict:
    return {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": init_args}}}


def _id(config: dict):
    return config["trainer"]["logger"]["init_args"].get("id")


def test_a_new_fit_gets_a_package_id_on_rank_zero_only_and_keeps_given_ids(monkeypatch):
    from lightning_methods.cli_runs import RANK_VARIABLES, give_wandb_id

    for name in (*RANK_VARIABLES, "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    ids = []
    for _ in range(200):
        config = _wandb_config()
        give_wandb_id(config)
        ids.append(_id(config))
    assert len(set(ids)) == 200 and all(re.fullmatch(r"r[0-9a-f]{11}", i) for i in ids)
    for given in ({"id": "mine"}, {"version": "v7"}):  # the user's own id (W&B takes version as the id)
        config = _wandb_config(**given)
        give_wandb_id(config)
        assert config == _wandb_config(**given)
    csv = {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {}}}}
    give_wandb_id(csv)
    assert _id(csv) is None  # CSV / TensorBoard number their versions themselves
    for name, value in [("RANK", "1"), ("SLURM_PROCID", "3"), ("LOCAL_RANK", "1"), ("NODE_RANK", "1"),
                        ("WANDB_RUN_ID", "sweep1")]:  # another rank (its run directory comes from rank zero); a sweep
        monkeypatch.setenv(name, value)
        config = _wandb_config()
        give_wandb_id(config)
        assert _id(config) is None, name
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    config = _wandb_config()
    give_wandb_id(config)
    assert _id(config) is not None


def test_a_config_whose_wandb_id_reads_as_a_number_stops_with_the_command_that_continues_it(tmp_path, monkeypatch,
                                                                                            one_thread):
    """An earlier version let W&B draw a fit's id; about one in 47,000 is digits and one ``e`` (``12345e67``), which
    jsonargparse reads as 1.2345e+71 from the run's config.yaml and refuses with a message about union subtypes. Such
    a run, interrupted: its printed resume command stops before parsing with the package's message, whose command
    continues the training in a new run; an evaluation with its config.yaml likewise, whose command evaluates it
    beside the run."""
    from lightning_methods.cli import build_cli, main
    from lightning_methods.cli_runs import check_wandb_ids, reads_as_number
    from lightning_methods.results.record import read_metrics_csv

    # what jsonargparse refuses (digits with an exponent or a dot), and what it keeps as the string it is
    assert [reads_as_number(t) for t in ("12345e67", "1.2345e+71", "12345678", "nan", "0x1a2b3c", "r12345e67",
                                         "3kq0x9ab", "12e", "e12")] == [True, True] + [False] * 7
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lightning_methods.cli_runs.new_wandb_id", lambda: "12345e67")  # what W&B could draw
    small = ["--config", str(REPO / "configs/quickstart.yaml"), "--trainer.enable_progress_bar=false",
             "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
             "--test_after_fit=off", "--trainer.enable_model_summary=false", "--trainer.max_epochs=2"]
    interrupted_fit(monkeypatch, small, at_epoch=1)
    run = tmp_path / "runs/quickstart/lightning-methods-quickstart/12345e67"
    last = run / "checkpoints/last.ckpt"
    assert last.is_file()
    with pytest.raises(ValueError) as stopped:
        main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)])
    message = str(stopped.value)
    assert f"{run / 'config.yaml'}: its W&B run id 12345e67" in message and "read by the config parser" in message
    command = message.split("To continue its training in a new run (a new W&B run and run directory), run:\n", 1)[1]
    argv = shlex.split(command)  # the whole last line: nothing after the path to copy by mistake
    assert argv[:2] == ["lightning-methods", "fit"]
    monkeypatch.undo()  # a new run gets the package's own id
    monkeypatch.chdir(tmp_path)
    build_cli([*argv[1:], "--trainer.enable_progress_bar=false", "--trainer.limit_train_batches=2",
               "--trainer.limit_val_batches=1", "--test_after_fit=off", "--trainer.max_epochs=2"])
    (new,) = [p for p in run.parent.iterdir() if p != run]
    assert re.fullmatch(r"r[0-9a-f]{11}", new.name)
    done = json.loads((new / "results.json").read_text())
    assert done["status"] == "finished" and done["epochs_completed"] == 2 and done["global_step"] == 4
    assert done["resumed_from"] == str(last)  # continued from the interrupted run's state
    assert [r["epoch"] for r in read_metrics_csv(new / "metrics.csv")] == [0, 1]  # its epoch 0 came with it
    # its evaluation: the message gives the command with the original config, which evaluates beside the run
    with pytest.raises(ValueError) as stopped:
        main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)])
    argv = shlex.split(str(stopped.value).split("(the results go beside the run and into its W&B run):\n")[1])
    assert argv[:2] == ["lightning-methods", "test"]
    cli = build_cli([*argv[1:], "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.loggers[0].version == "12345e67"  # the run's own W&B run
    assert json.loads((run / "results_test-last.json").read_text())["command"] == "test"
    with pytest.raises(ValueError, match="choose an id that starts with a letter"):
        check_wandb_ids(["fit", "--trainer.logger.init_args.id=777e1"])
    check_wandb_ids(["fit", "--config", str(new / "config.yaml"), "--config", str(tmp_path / "missing.yaml")])
