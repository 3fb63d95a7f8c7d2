"""``lightning-methods probe``: any package checkpoint (or a state dict) probed without training, with the OOD probe on
a seeded CIFAR-100 class subset (fake CIFAR files in the official format); files, W&B entries and bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tunnel_fakes import logged_text

from lightning_methods import ImageClassifier
from lightning_methods.cli import main as cli_main
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.tunnel.cli import run_probe_command

from helpers import quiet_trainer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ImageClassifier("mlp", 10, backbone_kwargs={"depth": 5, "width": 24})
    trainer = quiet_trainer(max_steps=5)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


FAST = ["--probe.max_train_samples", "200", "--probe.probe_epochs", "2", "--probe.extract_batch_size", "100"]


def test_probe_checkpoint_with_ood(checkpoint, fake_cifar_root, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    report = run_probe_command([
        "--ckpt", str(checkpoint), "--data", "DigitsDataModule", "--ood_data", "CIFAR100DataModule",
        "--ood_data.data_dir", str(fake_cifar_root[0]), "--ood_data.download", "false", "--probe.ood_classes", "10",
        "--output_dir", str(out), "--wandb_mode", "offline", "--wandb_project", "tunnel-test", *FAST])
    s = report.summary
    assert len(report.rows) == 5 and s["backbone"] == "mlp" and s["checkpoint"] == str(checkpoint)
    assert s["ood_data"] == "CIFAR100[10 classes]" and len(s["ood_classes"]) == 10 and s["global_step"] == 5
    assert s["samples"]["ood_train"] == 20  # fake CIFAR-100: 200 images over 100 classes, 10 classes kept
    assert all(r["acc_ood"] is not None for r in report.rows)
    csv = (out / "tunnel.csv").read_text().splitlines()
    assert len(csv) == 6 and csv[1].startswith("1,fc1,layers.0.act,24,")
    assert (out / "tunnel.png").stat().st_size > 1000 and (out / "tunnel.json").is_file()
    run_file = next((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert re.fullmatch(r"run-r[0-9a-f]{11}\.wandb", run_file.name)  # the package's kind of W&B run id
    logged = logged_text(run_file)
    assert "tunnel/table" in logged and "tunnel/plot" in logged


def test_list_points_and_state_dict_input(checkpoint, tmp_path, capsys, one_thread):
    cli_main(["probe", "--ckpt", str(checkpoint), "--list_points", "true"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["fc1", "fc2", "fc3", "fc4", "fc5"]
    ckpt = torch.load(checkpoint, weights_only=True)
    sd = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    torch.save(sd, tmp_path / "backbone.pt")
    with pytest.raises(ValueError, match="pass --backbone NAME and --num_classes N"):
        run_probe_command(["--ckpt", str(tmp_path / "backbone.pt"), "--list_points", "true"])
    report = run_probe_command([
        "--ckpt", str(tmp_path / "backbone.pt"), "--backbone", "mlp", "--num_classes", "10", "--backbone_kwargs",
        '{"depth": 5, "width": 24}', "--data", "DigitsDataModule", "--wandb_mode", "disabled",
        "--output_dir", str(tmp_path / "sd"), *FAST])
    assert len(report.rows) == 5 and (tmp_path / "sd" / "tunnel.csv").is_file()


def test_bad_input(checkpoint, fake_cifar_root, tmp_path, one_thread):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_probe_command(["--ckpt", str(tmp_path / "missing.ckpt"), "--list_points", "true"])
    with pytest.raises(ValueError, match="does not fit backbone 'mlp'"):
        run_probe_command(["--ckpt", str(checkpoint), "--backbone_kwargs", '{"depth": 6, "width": 24}',
                           "--list_points", "true"])
    with pytest.raises(ValueError, match="no module named 'layers.7.act'"):
        run_probe_command(["--ckpt", str(checkpoint), "--probe.points", "[layers.7.act]", "--list_points", "true"])
    with pytest.raises(ValueError, match="ood_classes=20 asks for more classes than CIFAR10 has \\(10\\)"):
        run_probe_command(["--ckpt", str(checkpoint), "--data", "DigitsDataModule", "--ood_data", "CIFAR10DataModule",
                           "--ood_data.data_dir", str(fake_cifar_root[0]), "--ood_data.download", "false",
                           "--probe.ood_classes", "20", "--wandb_mode", "disabled", *FAST])


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["probe", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--ckpt" in out and "--probe.pool_size" in out and "--ood_data" in out
