"""The CLI after issue 18: last.ckpt is the latest state after a full run and after a kill (item 1), ``--ckpt_path
last`` finds the run of the same config or says which runs exist (item 3), the resolved config lives in each run's
own directory (item 4), checkpoints load weights-only and corrupt ones are named (items 2, 6, 7), diverged runs stop
(item 9), manual-optimization settings fail early (item 13) and the package's error is printed last (item 14)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import NonFiniteTrainingError
from lightning_methods.checkpoint_io import CorruptCheckpointError, read_checkpoint
from lightning_methods.cli import build_cli, main
from lightning_methods.cli_runs import ResumeError

from helpers import interrupted_fit

REPO = Path(__file__).resolve().parents[2]
QUICK = str(REPO / "configs/quickstart.yaml")
#: the quickstart, small: 2 training batches and 1 validation batch per epoch, no test, offline W&B (the config's)
SMALL = ["--config", QUICK, "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--test_after_fit=off",
         "--trainer.enable_model_summary=false"]
PROJECT = Path("runs/quickstart/lightning-methods-quickstart")


def runs() -> list[Path]:
    return sorted(p.parent.parent.resolve() for p in PROJECT.glob("*/checkpoints/last.ckpt"))


def test_full_run_then_kill_and_resume_through_the_cli(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    # a full run: last.ckpt is the final epoch, the best checkpoint is kept beside it
    cli = build_cli(["fit", *SMALL, "--trainer.max_epochs=3"])
    assert cli.config.fit.weights_only is True  # the package default (Lightning's None means False + a warning)
    (run,) = runs()
    assert read_checkpoint(run / "checkpoints/last.ckpt")["epoch"] == 2
    assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["id"] == run.name and saved["ckpt_path"] is None
    assert not Path("runs/quickstart/config.yaml").exists()  # no config shared by every run
    out = capsys.readouterr().out
    command = f"lightning-methods fit --config {run / 'config.yaml'} --ckpt_path {run / 'checkpoints/last.ckpt'}"
    assert f"run {run.name} started" in out and f"run {run.name} finished" in out and out.count(command) == 2

    # a second run with 5 epochs, killed at the start of epoch 2: last.ckpt holds epoch 1
    interrupted_fit(monkeypatch, [*SMALL, "--trainer.max_epochs=5"], at_epoch=2)
    (killed,) = set(runs()) - {run}
    assert read_checkpoint(killed / "checkpoints/last.ckpt")["epoch"] == 1
    assert "stopped (KeyboardInterrupt)" in capsys.readouterr().out

    # `--ckpt_path last` without a run id resumes the killed run (same config), not the 3-epoch one
    cli = build_cli(["fit", *SMALL, "--trainer.max_epochs=5", "--ckpt_path=last"])
    assert cli.trainer.global_step == 5 * 2 and cli.trainer.loggers[0].version == killed.name
    assert runs() == sorted([run, killed])  # no third run directory
    assert read_checkpoint(killed / "checkpoints/last.ckpt")["epoch"] == 4
    assert f"resuming run {killed.name}" in capsys.readouterr().out

    # a config that no run has: nothing is trained, the runs are listed with their resume commands
    with pytest.raises(ResumeError, match="no run under .* has this config") as info:
        main(["fit", *SMALL, "--trainer.max_epochs=7", "--ckpt_path=last"])
    message = str(info.value)
    assert f"run {run.name}" in message and f"run {killed.name}" in message
    assert "differs in trainer.max_epochs" in message
    assert f"--config {killed / 'config.yaml'} --ckpt_path {killed / 'checkpoints/last.ckpt'}" in message

    # validate / test / predict never overwrite the run's config
    before = (killed / "config.yaml").read_text()
    build_cli(["test", *SMALL, f"--ckpt_path={killed / 'checkpoints/last.ckpt'}", "--trainer.limit_test_batches=1"])
    assert (killed / "config.yaml").read_text() == before and not Path("runs/quickstart/config.yaml").exists()


def test_ckpt_path_last_without_any_run_is_an_error(tmp_path, monkeypatch):
    """It used to train from scratch with exit code 0 and a misleading Lightning hint."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ResumeError, match="nothing to resume"):
        main(["fit", *SMALL, "--ckpt_path=last"])
    with pytest.raises(ResumeError, match="there is no .*nowhere/last.ckpt"):
        main(["fit", *SMALL, "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path / 'nowhere'}",
              "--ckpt_path=last"])


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoints_are_verified_and_weights_only_before_anything_is_built(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    args = [*SMALL, "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path / 'ckpt'}", "--trainer.max_epochs=2"]
    main(["fit", *args])
    last = tmp_path / "ckpt/last.ckpt"
    good = torch.load(last, weights_only=True)
    # code in a checkpoint never runs: refused unless --weights_only false is given explicitly
    marker = tmp_path / "code_ran"
    torch.save({**good, "extra": RunsCode(marker)}, tmp_path / "crafted.ckpt")
    with pytest.raises(ValueError, match="--weights_only false"):
        main(["test", *args, f"--ckpt_path={tmp_path / 'crafted.ckpt'}", "--trainer.limit_test_batches=1"])
    assert not marker.exists()
    # flipped bytes: refused, naming the previous good checkpoint
    data = bytearray(last.read_bytes())
    data[-300] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=f"--ckpt_path {tmp_path / 'ckpt/previous-last.ckpt'}"):
        main(["fit", *args, "--trainer.max_epochs=3", f"--ckpt_path={last}"])


@pytest.mark.parametrize("setting", ["--trainer.gradient_clip_val=1.0", "--trainer.accumulate_grad_batches=2"])
def test_manual_optimization_settings_fail_early_with_the_replacement(setting, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    replacement = "grad_clip_norm 1.0" if "clip" in setting else "larger data.init_args.batch_size"
    with pytest.raises(ValueError, match=replacement):
        main(["fit", *SMALL, "--trainer.logger=false", setting])


def test_a_diverging_run_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)

    def explode(self):
        if self.current_epoch == 1:
            for group in self.optimizers().optimizer.param_groups:
                group["lr"] = 1e30

    monkeypatch.setattr(ImageClassifier, "on_train_epoch_start", explode)
    with pytest.raises(NonFiniteTrainingError, match="SGD\\(lr=1e\\+30") as info:
        main(["fit", *SMALL, "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
              "--trainer.max_epochs=3"])
    assert f"--ckpt_path {tmp_path / 'ckpt/last.ckpt'}" in str(info.value)
    assert read_checkpoint(tmp_path / "ckpt/last.ckpt")["epoch"] == 0


def test_the_console_prints_the_package_error_last(tmp_path, monkeypatch, capsys):
    """jsonargparse wraps a model's ValueError in a union error with a Namespace dump; the console shows the
    package's own message as the last, framed lines and exits with 1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-methods", "fit", *SMALL, "--trainer.logger=false",
                                      "--model.init_args.backbone=resnet_999"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1
    err = capsys.readouterr().err.rstrip().splitlines()
    assert "Namespace(" in "\n".join(err)  # the dump is still there, for debugging ...
    assert err[-2].startswith("lightning-methods: error: ValueError: unknown backbone 'resnet_999'")  # ... but above
    assert set(err[-1]) == {"="} and set(err[-3]) == {"="}
