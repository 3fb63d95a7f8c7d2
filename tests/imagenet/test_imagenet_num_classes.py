"""The class count a DataModule saves as a hyperparameter is the one it trains on: a class subset or a class list
file sets it, the model's linked ``num_classes`` equals it, and a logged run (where Lightning merges the model's and
the DataModule's hyperparameters and stops on a mismatch) goes through."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from imagenet_tiny_tree import wnid, write_class_list, write_imagenet_tree

from lightning_methods.cli import main
from lightning_methods.datamodules import ImageNet200DataModule, ImageNetDataModule, NoisyImageNetDataModule

REPO = Path(__file__).resolve().parents[2]
HPN = REPO / "configs" / "imagenet" / "imagenet200_hpn_resnet32_d100.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_saved_num_classes_is_the_real_class_count(tmp_path):
    wnids = write_class_list(tmp_path / "wnids.txt", [wnid(c) for c in (3, 0, 2)])
    cases = [
        (ImageNetDataModule(class_subset=5), 5),
        (ImageNetDataModule(class_subset=[wnid(1), wnid(0)]), 2),
        (ImageNetDataModule(classes_file=str(wnids)), 3),
        (ImageNet200DataModule(classes_file=str(wnids)), 3),  # its own default 200 is not what it trains on
        (NoisyImageNetDataModule(classes_file=str(wnids)), 3),
        (ImageNetDataModule(), 1000),
    ]
    for dm, expected in cases:
        assert dm.num_classes == dm.hparams["num_classes"] == dm.hparams_initial["num_classes"] == expected, dm


def test_hpn_imagenet200_config_logs_with_the_class_file_count(tmp_path, monkeypatch):
    """The ImageNet-200 config with a 4-wnid class file and a CSV logger: no ``--data.num_classes`` is given, the
    DataModule takes 4 from the file, the model is linked to 4, and the logged hyperparameters agree."""
    assert "num_classes" not in yaml.safe_load(HPN.read_text())["data"]["init_args"]  # the file sets it
    monkeypatch.chdir(tmp_path)
    root = write_imagenet_tree(tmp_path / "imagenet", classes=5, per_class=2, val_per_class=1, size=(24, 28))
    wnids = write_class_list(tmp_path / "wnids.txt", [wnid(c) for c in range(4)])
    main(
        [
            "fit",
            "--config",
            str(HPN),
            f"--data.init_args.data_dir={root}",
            f"--data.init_args.classes_file={wnids}",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4",
            "--data.init_args.eval_batch_size=4",
            "--data.init_args.image_size=16",
            "--data.init_args.eval_resize=16",
            "--model.init_args.prototype_iterations=5",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path / 'logs'}",
            "--test_after_fit=off",
        ]
    )
    (hparams,) = (tmp_path / "logs").rglob("hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["num_classes"] == 4
    metrics = hparams.with_name("metrics.csv")  # the CSVLogger's (the package writes its own metrics.csv as well)
    assert any(row.get("epoch") == "0" for row in csv.DictReader(metrics.open()))
