"""The quickstart as a user runs it: learns the bundled digits to >= 95% test accuracy, leaves an offline W&B run
holding the logged metrics and the resolved config, and a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_methods import ImageClassifier
from lightning_methods.cli import build_cli

from helpers import read_wandb_records

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_quickstart_learns_and_leaves_wandb_run_and_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config itself asks for offline mode
    cli = build_cli(["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--trainer.enable_progress_bar=false"])
    assert cli.trainer.callback_metrics["test/acc"] >= 0.95

    ckpts = list((tmp_path / "runs/quickstart").rglob("*.ckpt"))
    assert {p.name for p in ckpts} >= {"last.ckpt"} and any(p.name.startswith("best-") for p in ckpts)
    restored = ImageClassifier.load_from_checkpoint(next(p for p in ckpts if p.name == "last.ckpt"))
    assert restored.hparams.backbone == "resnet8" and restored.hparams.num_classes == 10

    runs = list((tmp_path / "runs/quickstart/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    records = read_wandb_records(runs[0])
    def key(item):
        return item.key or "/".join(item.nested_key)

    history = {key(item) for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item}
    assert {"train/loss_epoch", "val/acc", "test/acc", "train/lr", "epoch"} <= history
    config = {key(item): item.value_json for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert '"backbone":"resnet8"' in config["model"].replace(" ", "")
    assert '"num_classes":10' in config["model"].replace(" ", "")  # linked value added to the resolved config
    assert "DigitsDataModule" in config["data"] and '"max_epochs":12' in config["trainer"].replace(" ", "")
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])
