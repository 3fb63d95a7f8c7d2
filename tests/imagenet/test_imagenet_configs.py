"""configs/imagenet/: the paper numbers are readable and listed, and the Early Cutting ``select`` configs (noisy
ImageNet-1k, mini-WebVision) parse, instantiate and run end to end on tiny trees in the real on-disk formats (the
``fit`` configs run in tests/core/test_configs.py through tests/imagenet/overrides_imagenet.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch import nn

from lightning_methods.noisy_labels.cli import build_parser, run_select
from lightning_methods.results.aggregate import paper_numbers
from lightning_methods.results.catalog import backbone_table, catalog

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "imagenet"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SELECT = [p for p in CONFIGS if "selection" in (yaml.safe_load(p.read_text()) or {})]

_spec = importlib.util.spec_from_file_location("imagenet_tiny_tree", Path(__file__).with_name("imagenet_tiny_tree.py"))
tree = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tree)  # type: ignore[union-attr]

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCNN(nn.Sequential):
    """Two conv layers (test backbone: the configs' ResNet-50 is covered by the fit smoke tests)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, num_classes),
        )


SMALL = [
    '--model.init_args.backbone={"class_path": "test_imagenet_configs.TinyCNN", "init_args": {"num_classes": 4}}',
    "--model.init_args.channels_last=false",
]
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--trainer.devices=1",
]


def _data_args(path: Path, tmp_path: Path) -> list[str]:
    """Point a select config at a tiny tree of its format (ILSVRC2012 folders or WebVision 1.0 lists)."""
    data = yaml.safe_load(path.read_text())["data"]
    args = [
        "--data.init_args.num_workers=0",
        "--data.init_args.image_size=32",
        "--data.init_args.eval_resize=36",
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=16",
    ]
    if data["class_path"].endswith("WebVisionDataModule"):
        root = tree.write_webvision_tree(
            tmp_path / "webvision", classes=4, extra_classes=2, per_class=10, val_per_class=3
        )
        return [f"--data.init_args.data_dir={root}", "--data.init_args.num_classes=4", *args]
    root = tree.write_imagenet_tree(tmp_path / "imagenet", classes=4, per_class=10, val_per_class=3)
    return [f"--data.init_args.data_dir={root}", "--data.init_args.num_classes=4", *args]


def test_every_config_names_its_paper_and_is_listed():
    data = catalog(REPO, ["configs"])
    listed = {item["path"] for item in data["configs"]["imagenet"]}
    assert listed == {f"configs/imagenet/{p.name}" for p in CONFIGS}
    for path in (p for p in CONFIGS if not p.name.startswith("demo_")):  # demos reproduce no paper row
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any(line.startswith("# paper:") for line in header), path.name  # a number, or why there is none
        assert "arXiv" in " ".join(header[:6]) or "OpenReview" in " ".join(header[:6]), path.name
    # numbers that were confirmed in the official repositories are machine-readable
    assert paper_numbers(CONFIG_DIR / "imagenet_res34_res18_dkd.yaml") == {"best/val/acc": 71.70}
    assert paper_numbers(CONFIG_DIR / "imagenet_res50_mv1_kd.yaml") == {"best/val/acc": 70.50}
    assert paper_numbers(CONFIG_DIR / "imagenet_resnet50_anyprecision.yaml")["test/acc_bit32"] == 74.63
    backbones = {b["name"]: b["params"] for b in backbone_table(1000, ["imagenet_resnet50", "imagenet_mobilenetv1"])}
    assert backbones["imagenet_resnet50"] == 25_557_032 and backbones["imagenet_mobilenetv1"] == 4_231_976


@pytest.mark.parametrize("path", SELECT, ids=lambda p: p.name)
def test_select_configs_instantiate(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(path), *_data_args(path, tmp_path), *SMALL, f"--run_dir={tmp_path}/run"])
    raw = yaml.safe_load(path.read_text())
    for key, value in raw["selection"].items():
        assert cfg.selection[key] == value
    init = parser.instantiate_classes(cfg)
    assert init.model.num_classes == init.data.num_classes == 4  # linked
    init.data.setup("fit")
    n = len(init.data.full_train_set if init.data.full_train_set is not None else init.data.train_set)
    if raw["data"]["class_path"].endswith("NoisyImageNetDataModule"):
        assert init.data.noise_stats["noise/realized_rate"] > 0
        assert n == 36  # 40 training images, 10% held out as noisy validation data
    else:  # WebVision: only the first 4 classes' 40 Google images, 10% held out
        assert n == 36
    Trainer(**{**init.trainer, "logger": False})


@pytest.mark.parametrize("path", SELECT, ids=lambda p: p.name)
def test_select_config_runs_end_to_end(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    summary = run_select(
        [
            "--config",
            str(path),
            *_data_args(path, tmp_path),
            *SMALL,
            *QUIET,
            "--trainer.max_epochs=3",
            "--selection.rounds=1",
            "--selection.warm_up_epochs=-1",
            "--selection.k=1",
            "--selection.lag=0",
            "--selection.keep_rate=0.3",
            "--selection.score_batch_size=16",
            f"--run_dir={run}",
        ]
    )
    assert summary["status"] == "done" and summary["final"]["status"] == "done"
    stats = json.loads((run / "round0" / "stats.json").read_text())
    assert stats["selected_size"] > 0
    assert summary["test_acc_last"] is not None
    last = run / "final" / "checkpoints" / "last.ckpt"
    assert last.is_file()


def test_webvision_final_checkpoint_tests_on_ilsvrc12_classes(tmp_path, monkeypatch):
    """The ILSVRC12 column of mini-WebVision (docs/imagenet.md): the final round's checkpoint evaluated on the
    ILSVRC2012 validation images of the same classes (WebVision's synsets.txt names their wnids)."""
    from lightning_methods import CoTrainingClassifier
    from lightning_methods.datamodules import WebVisionDataModule

    monkeypatch.chdir(tmp_path)
    path = CONFIG_DIR / "webvision_mini_early_cutting.yaml"
    run = tmp_path / "run"
    run_select(
        [
            "--config",
            str(path),
            *_data_args(path, tmp_path),
            *SMALL,
            *QUIET,
            "--trainer.max_epochs=2",
            "--selection.rounds=1",
            "--selection.warm_up_epochs=-1",
            "--selection.k=1",
            "--selection.lag=0",
            "--selection.keep_rate=0.3",
            f"--run_dir={run}",
        ]
    )
    imagenet = tree.write_imagenet_tree(tmp_path / "imagenet", classes=5, per_class=1, val_per_class=3)
    # (a backbone given as a module object is not a saved hyperparameter: pass it again; a named one is rebuilt)
    model = CoTrainingClassifier.load_from_checkpoint(
        run / "final" / "checkpoints" / "last.ckpt", weights_only=True, backbone=TinyCNN(4)
    )
    data = WebVisionDataModule(
        data_dir=str(tmp_path / "webvision"),
        num_classes=4,
        eval_on="ilsvrc12",
        imagenet_dir=str(imagenet),
        image_size=32,
        eval_resize=36,
        eval_batch_size=16,
        num_workers=0,
    )
    (result,) = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    ).test(model, datamodule=data)
    # 4 of the 5 ImageNet classes (WebVision's first 4 synsets), 3 validation images each
    assert len(data.test_set) == 12
    expected = tree.read_answers(imagenet)
    labels = sorted(c for p, c in expected.items() if p.startswith("val/") and c < 4)
    assert sorted(data.test_set.targets.tolist()) == labels
    assert 0.0 <= result["test/acc"] <= 1.0


FED = CONFIG_DIR / "tinyimagenet_fedfree_htfe8_100clients.yaml"


def test_fed_config_parses_and_reads_tinyimagenet(tmp_path):
    """The FedFree Tiny-ImageNet config parses; its DataModule partitions the Tiny-ImageNet release (200 classes)."""
    from lightning_methods.federated.cli import build_parser

    vit_files = importlib.util.spec_from_file_location(
        "vit_locality_tiny_files_fed", REPO / "tests" / "vit_locality" / "vit_locality_tiny_files.py"
    )
    files = importlib.util.module_from_spec(vit_files)
    vit_files.loader.exec_module(files)  # type: ignore[union-attr]
    files.write_fake_tinyimagenet(tmp_path, per_class=8, n_val=6)
    parser = build_parser()
    cfg = parser.parse_args(
        [
            "--config",
            str(FED),
            "--data.data_dir",
            str(tmp_path),
            "--data.download",
            "false",
            "--data.partition.num_clients",
            "2",
            "--data.partition.scheme",
            "iid",
        ]
    )
    assert cfg.data.dataset == "tinyimagenet" and cfg.federation.rounds == 200
    init = parser.instantiate_classes(cfg)
    data = init.data
    data.setup()
    assert data.num_classes == 200 and data.mean == (0.4802, 0.4481, 0.3975)
    train = torch.cat([data.client_train[c].images for c in range(2)])
    test = torch.cat([data.client_test[c].images for c in range(2)])
    # IID split of the 3 x 8 training images; local test sets from the 6 validation images (merge false)
    assert train.shape[1:] == (3, 64, 64) and len(train) == 3 * 8 and len(test) == 6


def test_fed_config_first_round(tmp_path, monkeypatch):
    """One FedFree round of the config on 64 px Tiny-ImageNet files (the client models take the DataModule's size)."""
    from lightning_methods.federated.cli import run

    monkeypatch.chdir(tmp_path)
    vit_files = importlib.util.spec_from_file_location(
        "vit_locality_tiny_files_fed2", REPO / "tests" / "vit_locality" / "vit_locality_tiny_files.py"
    )
    files = importlib.util.module_from_spec(vit_files)
    vit_files.loader.exec_module(files)  # type: ignore[union-attr]
    files.write_fake_tinyimagenet(tmp_path / "data", per_class=8, n_val=6)
    summaries = run(
        [
            "--config",
            str(FED),
            "--run_dir",
            str(tmp_path / "run"),
            "--progress",
            "false",
            "--logger",
            "null",
            "--data.data_dir",
            str(tmp_path / "data"),
            "--data.download",
            "false",
            "--data.partition.num_clients",
            "2",
            "--data.partition.scheme",
            "iid",
            "--federation.rounds",
            "1",
            "--federation.families",
            "[fed_cnn, fed_resnet8]",
            "--federation.local_epochs",
            "1",
            "--trainer",
            json.dumps({"accelerator": "cpu", "devices": 1, "precision": "32-true", "limit_train_batches": 1}),
        ]
    )
    assert summaries[0]["rounds"] == 1 and 0 <= summaries[0]["final_mean"] <= 1


def test_emq_imagenet_config_trains_on_bitwise_coresets(tmp_path, monkeypatch):
    """EMQ on the ImageNet DataModule past its warm-up epoch: every bit-width scores the file-backed training set and
    trains on its own 40% coreset (prune rate 0.6), stored in the checkpoint."""
    from lightning_methods.cli import main

    monkeypatch.chdir(tmp_path)
    root = tree.write_imagenet_tree(tmp_path / "imagenet", classes=4, per_class=6, val_per_class=1)
    main(["fit", "--config", str(CONFIG_DIR / "imagenet_resnet18_emq.yaml"), "--trainer.max_epochs=2",
          "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.logger=false",
          f"--trainer.default_root_dir={tmp_path / 'run'}", "--test_after_fit=off",
          "--trainer.enable_progress_bar=false",
          f"--data.init_args.data_dir={root}", "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
          "--data.init_args.eval_batch_size=4", "--data.init_args.num_classes=4", "--data.init_args.image_size=32",
          "--data.init_args.eval_resize=36", "--model.init_args.backbone=resnet8", "--model.init_args.bits=[2, 32]",
          "--model.init_args.eval_bits=[2, 32]"])
    (last,) = (tmp_path / "run").rglob("last.ckpt")
    ckpt = torch.load(last, weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("BitwiseCoresetCallback")]
    assert state["n"] == 24 and state["refresh_epoch"] == 1
    for bits in (2, 32):
        subset = torch.as_tensor(state["subsets"][bits])
        assert len(subset) == round(0.4 * 24) and len(set(subset.tolist())) == len(subset)
        assert 0 <= int(subset.min()) and int(subset.max()) < 24
