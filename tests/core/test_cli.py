"""The lightning-methods command line: help, print_config, subcommands, errors with advice."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_methods.cli import build_cli, main, repeated_keys, resolve_configs

REPO = Path(__file__).resolve().parents[2]
CIFAR = str(REPO / "configs/cifar100/resnet18.yaml")
QUICK = str(REPO / "configs/quickstart.yaml")
FAST = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


def run_exit(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


def test_help_lists_the_package_arguments(capsys):
    code, out = run_exit(["fit", "--help"], capsys)
    assert code == 0 and "--test_after_fit" in out and "--checkpoint.monitor" in out and "--data CONFIG" in out


def test_print_config_resolves_the_yaml_and_accepts_ddp(capsys):
    code, out = run_exit(["fit", "--config", CIFAR, "--trainer.devices=4", "--trainer.strategy=ddp", "--print_config"],
                         capsys)
    cfg = yaml.safe_load(out)
    assert code == 0
    assert cfg["model"]["class_path"] == "lightning_methods.ImageClassifier"
    assert cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.1
    assert str(cfg["trainer"]["devices"]) == "4" and cfg["trainer"]["strategy"] == "ddp"
    assert cfg["data"]["init_args"]["batch_size"] == 128


def test_unknown_config_key_is_an_error_naming_it(capsys, tmp_path):
    code, out = run_exit(["fit", "--config", QUICK, "--model.init_args.learning_rate=0.1"], capsys)
    assert code != 0 and "learning_rate" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(QUICK).read_text().replace("max_epochs:", "max_epoch:"))
    code, out = run_exit(["fit", "--config", str(bad)], capsys)
    assert code != 0 and "max_epoch" in out


def test_unknown_backbone_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Known CIFAR backbones"):
        main(["fit", "--config", QUICK, "--model.init_args.backbone=resnet_999", *FAST])


def test_missing_cifar_without_download_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        main(["fit", "--config", CIFAR, f"--data.init_args.data_dir={tmp_path}", "--data.init_args.download=false",
              "--trainer.fast_dev_run=1", *FAST])


def test_fit_then_validate_test_predict_from_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", QUICK, *FAST, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
            f"--checkpoint.dirpath={tmp_path / 'ckpt'}"]
    cli = build_cli(["fit", *args, "--test_after_fit=last"])
    assert cli.trainer.global_step == 2
    assert "test/acc" in cli.trainer.callback_metrics  # test_after_fit ran
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.exists() and (tmp_path / "config.yaml").exists()
    for sub in ("validate", "test", "predict"):
        cli = build_cli([sub, "--config", QUICK, *FAST, f"--ckpt_path={ckpt}", "--trainer.limit_val_batches=1",
                         "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1"])
    preds = cli.trainer.predict_loop.predictions
    assert preds and preds[0]["probs"].shape[1] == 10


def test_a_failed_run_does_not_leave_its_wandb_run_open(tmp_path, monkeypatch):
    """A later WandbLogger in the same process (a notebook) would otherwise log into the crashed run."""
    import wandb

    from lightning_methods import ImageClassifier

    def crash(self, batch, batch_idx):
        assert wandb.run is not None  # the run was open when training failed
        raise RuntimeError("crashed mid-training")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ImageClassifier, "training_step", crash)
    with pytest.raises(RuntimeError, match="crashed mid-training"):
        main(["fit", "--config", QUICK, "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"])
    assert wandb.run is None


def test_wandb_runs_land_in_the_directory_each_command_runs_in(tmp_path, monkeypatch):
    """W&B's service process keeps the working directory of the first run: a relative save_dir must be resolved
    per command, or a second run in the same process (notebook, test session) writes its files elsewhere."""
    args = ["fit", "--config", QUICK, "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
            "--test_after_fit=off"]
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        main(args)
        assert len(list((tmp_path / name / "runs/quickstart/wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_short_class_names_resolve(capsys):
    """``--model ImageClassifier --data DigitsDataModule``: the package's classes resolve by short name although the
    package ``__init__``s import lazily (``cli.import_public_classes``)."""
    code, out = run_exit(["fit", "--model", "ImageClassifier", "--model.backbone", "resnet8", "--data",
                          "DigitsDataModule", "--trainer.callbacks+=LatestCheckpoint", "--print_config"], capsys)
    cfg = yaml.safe_load(out)
    assert code == 0
    assert cfg["model"]["class_path"] == "lightning_methods.ImageClassifier"
    assert cfg["data"]["class_path"].endswith(".DigitsDataModule")


def test_a_subcommand_builds_only_its_own_parser_and_the_top_level_help_lists_all(tmp_path, monkeypatch, capsys):
    """``fit ...`` (and each other subcommand) parses with its own parser only (LightningCLI would build all four, a
    quarter of a small fit's start-up); a command line without a leading subcommand still gets all four."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_methods.cli_lightning import LightningMethodsCLI, _make_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(LightningMethodsCLI, "_run_subcommand", lambda self, subcommand: None)  # parse + instantiate
    for sub in ("fit", "validate", "test", "predict"):
        cli = build_cli([sub, "--config", QUICK, *FAST])
        assert cli.subcommand == sub and list(cli._subcommand_parsers) == [sub]
        assert cli.config[sub]["model"]["init_args"]["backbone"] == "resnet8"
    per_subcommand = {sub: {"description": f"{sub} here"} for sub in ("fit", "test")}  # LightningCLI's parser_kwargs
    cli = LightningMethodsCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                              parser_kwargs=per_subcommand, args=["test", "--config", QUICK, *FAST])
    assert list(cli._subcommand_parsers) == ["test"] and cli._subcommand_parsers["test"].description == "test here"
    with pytest.raises(SystemExit) as info:
        _make_cli(["--help"], run=True)
    out = capsys.readouterr().out
    assert info.value.code == 0 and all(f"    {sub}" in out for sub in ("fit", "validate", "test", "predict")), out


def test_relative_configs_missing_here_come_from_the_checkout(tmp_path, monkeypatch, capsys):
    """`--config configs/...` typed in another folder: the checkout's file (both option forms, `-c` too, a note on
    stderr); a file of that name in the current folder, an absolute path and a path the checkout lacks stay as given."""
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", "configs/quickstart.yaml", "--config=configs/base/ddp.yaml", "-c", "configs/nope.yaml",
            "--trainer.max_epochs", "1"]
    assert resolve_configs(argv) == ["fit", "--config", str(repo / "configs/quickstart.yaml"),
                                     f"--config={repo / 'configs/base/ddp.yaml'}", "-c", "configs/nope.yaml",
                                     "--trainer.max_epochs", "1"]
    err = capsys.readouterr().err
    assert f"configs/quickstart.yaml is not in {tmp_path}: using {repo / 'configs/quickstart.yaml'}" in err
    assert err.count("[lightning-methods]") == 2
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("seed_everything: 1\n")
    mine = ["fit", "--config", "configs/quickstart.yaml", "--config", str(repo / "configs/base/ddp.yaml")]
    assert resolve_configs(mine) == mine and capsys.readouterr().err == ""


def test_repeated_keys_are_found_in_every_mapping_with_their_lines():
    text = ("model:\n  init_args:\n    backbone: resnet8\n    lr: 0.1\n    backbone: resnet20\n"
            "base: &b {x: 1}\nmerged:\n  <<: *b\n  y: 2\n"
            "callbacks:\n  - class_path: A\n    init_args: {k: 1, k: 2}\n  - class_path: B\n"
            "model: again\n")
    assert repeated_keys(text) == [("backbone", 5), ("k", 12), ("model", 14)]
    assert repeated_keys("a: 1\nb: {a: 1}\n- c") == []  # not YAML: the parser's own error names the file
    assert repeated_keys("a: [1, 2]\nb: {a: 1}\n") == [] and repeated_keys("") == []


@pytest.mark.parametrize("command", ["fit", "fed", "grid"])
def test_a_config_with_a_repeated_key_stops_before_anything_runs(command, tmp_path, monkeypatch):
    """YAML keeps the last of two equal keys silently (the config parser too): every command refuses such a file,
    given with --config (both forms, grid's second config included) or as the YAML value of another option, naming
    the file, the key and its line; nothing is written."""
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "mine.yaml"
    bad.write_text(Path(QUICK).read_text() + "\nseed_everything: 3\n")
    line = len(Path(QUICK).read_text().splitlines()) + 2
    assert "seed_everything" in yaml.safe_load(Path(QUICK).read_text())  # the quickstart has the key already
    given = {"fit": ["--config", str(bad)], "fed": [f"--config={bad}"], "grid": ["--config", QUICK, str(bad)]}
    with pytest.raises(ValueError, match=rf"{bad}: .*'seed_everything' again on line {line}\b"):
        main([command, *given[command]])
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text("- class_path: A\n  init_args: {k: 1}\n  init_args: {k: 2}\n")
    with pytest.raises(ValueError, match=r"callbacks.yaml: .*'init_args' again on line 3"):
        main(["fit", "--config", QUICK, f"--trainer.callbacks={callbacks}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["callbacks.yaml", "mine.yaml"]

