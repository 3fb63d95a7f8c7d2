"""The digits demo as a user runs it (configs/quantization/digits_emq.yaml): EMQ learns every bit-width, 4- and 8-bit
stay within a few points of 32-bit, the run leaves the cost file, the W&B entries and a checkpoint that
``lightning-methods test`` evaluates at any list of bit-widths. The full demo is slow; a 3-epoch version runs by
default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_methods.callbacks import BitwiseCoresetCallback
from lightning_methods.cli import build_cli
from lightning_methods.quantization import union_fraction

from helpers import read_wandb_records

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/quantization/digits_emq.yaml")


def wandb_history_keys(root: Path) -> set[str]:
    runs = list(root.glob("runs/multibit/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    return {item.key or "/".join(item.nested_key) for r in read_wandb_records(runs[0])
            if r.WhichOneof("record_type") == "history" for item in r.history.item}


def check_run(root: Path, epochs: int) -> Path:
    cost_files = list(root.glob("runs/multibit/**/checkpoints/multibit_cost.json"))
    assert len(cost_files) == 1
    cost = json.loads(cost_files[0].read_text())
    assert [e["epoch"] for e in cost["epochs"]] == list(range(epochs))
    assert cost["epochs"][-1]["train_samples"] < cost["epochs"][0]["train_samples"]  # coreset epochs: fewer
    keys = wandb_history_keys(root)
    # entries of the first epoch (the last records of an offline run file may still be in flight on a busy machine)
    assert {"val/acc_bit4", "val/acc_bit32", "cost/epoch_time_s", "cost/total_samples", "cost/samples_bit1",
            "coreset/active", "train/loss_bit8"} <= keys, sorted(keys)
    return cost_files[0].parent / "last.ckpt"


def test_short_demo_learns_and_the_test_command_evaluates_any_bits(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config asks for offline mode itself
    cli = build_cli(["fit", "--config", CONFIG, "--trainer.max_epochs=2", "--trainer.limit_val_batches=1",
                     "--trainer.callbacks.init_args.warmup_full=1", "--model.init_args.lr_scheduler.init_args.T_max=2",
                     "--model.init_args.recalib_batches=1", "--model.init_args.eval_bits=[3,4,32]"])
    metrics = cli.trainer.callback_metrics
    assert all(metrics[f"test/acc_bit{b}"] > 0.3 for b in (3, 4, 32)), metrics  # 10 classes: chance is 0.1
    coreset = next(c for c in cli.trainer.callbacks if isinstance(c, BitwiseCoresetCallback))
    assert union_fraction(list(coreset.subsets.values()), coreset.n) > 0.5  # the children's subsets differ
    ckpt = check_run(tmp_path, 2)
    test = build_cli(["test", "--config", CONFIG, "--ckpt_path", str(ckpt), "--trainer.logger=false",
                      "--trainer.limit_test_batches=1", "--model.init_args.eval_bits=[2,5,6,32]",
                      "--model.init_args.recalib_batches=1"])
    assert {"test/acc_bit5", "test/acc_bit6", "test/acc_bit2", "test/acc_bit32"} <= set(test.trainer.callback_metrics)
    assert "test/acc_bit4" not in test.trainer.callback_metrics


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_full_demo_keeps_4_and_8_bit_close_to_32_bit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cli = build_cli(["fit", "--config", CONFIG])
    acc = {b: float(cli.trainer.callback_metrics[f"test/acc_bit{b}"]) for b in (1, 2, 3, 4, 8, 32)}
    assert acc[32] >= 0.85, acc  # measured 0.937
    assert acc[4] >= acc[32] - 0.05 and acc[8] >= acc[32] - 0.05, acc  # measured 0.948 and 0.941
    check_run(tmp_path, 12)
