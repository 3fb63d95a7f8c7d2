"""ResultsWriter: results.json / metrics.csv after fit, test and validate; the W&B summary keeps best and last."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import LatestCheckpoint, ResultsWriter
from lightning_methods.callbacks.results_writer import identity_config
from lightning_methods.cli import build_cli
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.results.record import FORMAT, config_hash, read_metrics_csv

from helpers import TinyNet, quiet_trainer, read_wandb_records

REPO = Path(__file__).resolve().parents[2]
QUICK = str(REPO / "configs/quickstart.yaml")
# lr x100 after 3 epochs: the last epoch collapses, so the best epoch is not the last one
STEP_LR = '{"class_path":"torch.optim.lr_scheduler.StepLR","init_args":{"step_size":3,"gamma":100}}'


def wandb_epoch_values(run_file: Path, key: str) -> dict[int, float]:
    """``{epoch: value}`` of ``key`` from the history records of an offline W&B run file."""
    out = {}
    for rec in read_wandb_records(run_file):
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
        if key in items:
            out[int(items["epoch"])] = float(items[key])
    return out


def wandb_metric_and_summary(run_file: Path) -> tuple[dict, dict]:
    metrics, summary = {}, {}
    for rec in read_wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "metric" and rec.metric.name:
            metrics[rec.metric.name] = rec.metric.summary
        elif kind == "summary":
            summary.update({(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in rec.summary.update})
    return metrics, summary


def test_results_json_after_a_digits_fit(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", QUICK, "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                     "--trainer.max_epochs=4", "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=2",
                     "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0", "--test_after_fit=best",
                     f"--model.init_args.lr_scheduler={STEP_LR}"])
    writer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ResultsWriter))
    run_id = cli.trainer.logger.version
    run_dir = tmp_path / "runs/quickstart/lightning-methods-quickstart" / run_id
    record = json.loads((run_dir / "results.json").read_text())
    rows = read_metrics_csv(run_dir / "metrics.csv")

    assert record["format"] == FORMAT and record["status"] == "finished" and record["command"] == "fit"
    assert record["run_id"] == run_id and Path(record["run_dir"]) == run_dir
    assert record["config"]["trainer"]["logger"]["init_args"]["id"] == run_id  # the package's id, given before fit
    # the hash leaves out where the run resumes from (docs/results.md): the same for every run of this config
    assert record["config_path"] == QUICK and record["config_hash"] == config_hash(identity_config(record["config"]))
    assert record["config"]["model"]["init_args"]["num_classes"] == 10  # the linked value is recorded
    assert record["seed"] == 0 and record["versions"]["torch"] == torch.__version__.split("+")[0]
    assert record["epochs_completed"] == 4 and record["global_step"] == 20 and record["wall_time_s"] > 0
    assert record["device"]["accelerator"] == "cpu" and record["device"]["world_size"] == 1

    # the history is the logged history (W&B), one row per epoch, and best/last come from it
    run_file = Path(glob.glob(str(tmp_path / f"runs/quickstart/wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))[0])
    logged = wandb_epoch_values(run_file, "val/acc")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] == sorted(logged)
    assert [r["val/acc"] for r in rows] == pytest.approx([logged[e] for e in range(4)], abs=1e-8)
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.05, 5.0])  # StepLR x100 from epoch 3
    assert all("train/acc" in r and "train/lr" in r for r in rows)
    best_epoch = max(range(4), key=lambda e: (logged[e], -e))  # first maximum, as ModelCheckpoint keeps it
    assert record["best"]["epoch"] == best_epoch != 3 and record["last"]["epoch"] == 3
    assert record["metrics"]["best/val/acc"] == pytest.approx(logged[best_epoch], abs=1e-8)
    assert record["metrics"]["last/val/acc"] == pytest.approx(logged[3], abs=1e-8)
    assert record["checkpoints"]["best"].endswith(f"best-{best_epoch:03d}.ckpt")
    assert record["best"]["metrics"]["val/acc"] == pytest.approx(record["checkpoints"]["best_score"])

    # the test metrics are those of the checkpoint named in the record (the best one), not of the final weights
    assert record["test"]["checkpoint"] == record["checkpoints"]["best"] == writer.record(cli.trainer)["test"][
        "checkpoint"]
    evaluate = quiet_trainer(limit_test_batches=2)
    again = evaluate.test(cli.model, datamodule=cli.datamodule, ckpt_path=record["test"]["checkpoint"], verbose=False)
    final = evaluate.test(cli.model, datamodule=cli.datamodule, ckpt_path=record["checkpoints"]["last"], verbose=False)
    again, final = again[0], final[0]
    assert record["test"]["metrics"]["test/acc"] == pytest.approx(again["test/acc"], abs=1e-7)
    assert record["test"]["metrics"]["test/loss"] == pytest.approx(again["test/loss"], rel=1e-6)
    assert final["test/loss"] != pytest.approx(again["test/loss"], rel=1e-3)

    # W&B keeps the best validation accuracy as well as the last, and the record's flat metrics
    metrics, summary = wandb_metric_and_summary(run_file)
    assert metrics["val/acc"].max and metrics["val/acc"].last and metrics["val/loss"].min
    assert summary["val/acc"]["max"] == pytest.approx(logged[best_epoch]) and summary["val/acc"]["last"] == \
        pytest.approx(logged[3])
    assert summary["best/val/acc"] == pytest.approx(logged[best_epoch]) and summary["best/epoch"] == best_epoch
    assert summary["test/acc"] == pytest.approx(record["test"]["metrics"]["test/acc"])


class CrashAt(ImageClassifier):
    """Fails at a given global step (a killed run)."""

    def __init__(self, crash_step: int = -1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.crash_step = crash_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_step:
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def fit_digits(run_dir: Path, max_epochs: int, crash_step: int = -1, ckpt_path: str | None = None):
    torch.manual_seed(0)
    model = CrashAt(crash_step=crash_step, backbone=TinyNet(10), num_classes=10)
    data = DigitsDataModule(batch_size=32, seed=0)
    ckpt = LatestCheckpoint(dirpath=str(run_dir / "checkpoints"), monitor="val/acc", mode="max",
                            filename="best-{epoch:03d}")
    trainer = quiet_trainer(max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=2,
                            enable_checkpointing=True, callbacks=[ResultsWriter(), ckpt], default_root_dir=run_dir)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, data


def test_failed_fit_is_recorded_and_a_resume_keeps_the_whole_history(tmp_path, one_thread):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_digits(run, max_epochs=4, crash_step=7)  # dies in epoch 2
    failed = json.loads((run / "results.json").read_text())
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]
    before = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in before] == [0, 1]

    trainer, model, data = fit_digits(run, max_epochs=4, ckpt_path=str(run / "checkpoints/last.ckpt"))
    record = json.loads((run / "results.json").read_text())
    rows = read_metrics_csv(run / "metrics.csv")
    assert record["status"] == "finished" and record["resumed_from"].endswith("last.ckpt")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and rows[:2] == before  # train metrics of epoch 1 included
    assert record["wall_time_s"] >= failed["wall_time_s"]
    best = max(rows, key=lambda r: (r["val/acc"], -r["epoch"]))
    assert record["best"]["epoch"] == best["epoch"] and record["best"]["metrics"]["val/acc"] == pytest.approx(
        best["val/acc"])

    # a validate command in the same directory never overwrites the fit's record: one record per checkpoint
    trainer = quiet_trainer(limit_val_batches=2, callbacks=[ResultsWriter()], default_root_dir=run)
    metrics = trainer.validate(model, data, ckpt_path=record["checkpoints"]["best"], verbose=False)[0]
    tag = Path(record["checkpoints"]["best"]).stem  # best-NNN: a checkpoint of this run's checkpoints/
    val = json.loads((run / f"results_validate-{tag}.json").read_text())
    assert val["command"] == "validate" and val["validate"]["checkpoint"] == record["checkpoints"]["best"]
    assert val["validate"]["metrics"]["val/acc"] == pytest.approx(metrics["val/acc"])
    assert val["validate"]["metrics"]["val/acc"] == pytest.approx(record["best"]["metrics"]["val/acc"])
    assert json.loads((run / "results.json").read_text()) == record
    assert (run / f"metrics_validate-{tag}.csv").is_file()


def test_checkpoint_paths_survive_the_test_of_the_best_checkpoint(tmp_path, one_thread):
    """``test_after_fit: best`` (``trainer.test(ckpt_path="best")``) restores the ModelCheckpoint's state from the best
    checkpoint, written before any ``last.ckpt``: the record still names the fit's last checkpoint (not ``null``)."""
    run = tmp_path / "run"
    trainer, model, data = fit_digits(run, max_epochs=1)  # the best epoch is epoch 0, saved before last.ckpt
    trainer.test(model, data, ckpt_path="best", verbose=False)
    record = json.loads((run / "results.json").read_text())
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    assert record["test"]["checkpoint"] == str(best.resolve()) and record["checkpoints"]["best"] == str(best)
    assert record["checkpoints"]["last"] == str(run / "checkpoints/last.ckpt")
    assert record["checkpoints"]["best_score"] == pytest.approx(record["best"]["metrics"]["val/acc"])
