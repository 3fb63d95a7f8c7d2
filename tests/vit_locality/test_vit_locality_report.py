"""``lightning-methods locality``: the paper-style table from several checkpoints (conditions read from the stored
hyperparameters, mean +- std over seeds, values equal to a direct computation), cache, labels, folders, and clear
errors for incompatible or unsuitable checkpoints."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

import lightning_methods.vit_locality.cli as locality_cli
from lightning_methods.analysis.attention import attention_locality, probe_indices
from lightning_methods.cli import main as package_main
from lightning_methods.datamodules import CIFAR100DataModule
from lightning_methods.datamodules.transforms import normalize
from lightning_methods.utils import atomic_torch_save, safe_torch_load
from lightning_methods.vit_locality.checkpoints import load_checkpoint_backbone

from helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def checkpoints(fake_cifar_root, tmp_path_factory):
    """A real checkpoint of a short CIFAR-100 run (Baseline), plus copies with other weights (seeds) and the Modern
    protocol written into their hyperparameters."""
    from functools import partial

    from lightning_methods.vit_locality import ViTLocalityClassifier

    root, _ = fake_cifar_root
    out = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = ViTLocalityClassifier(num_classes=100, backbone_kwargs=TINY,
                                  optimizer=partial(torch.optim.AdamW, lr=1e-3))
    dm = CIFAR100DataModule(data_dir=str(root), download=False, num_workers=0, batch_size=16)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, dm)
    trainer.save_checkpoint(out / "base0.ckpt")
    restored = ViTLocalityClassifier.load_from_checkpoint(out / "base0.ckpt")  # torch's default weights_only=True
    assert restored.hparams.backbone_kwargs == TINY and restored.hparams.num_classes == 100
    ckpt = safe_torch_load(out / "base0.ckpt")
    paths = {"base0": out / "base0.ckpt"}
    for i, name in enumerate(("base1", "modern0", "modern1"), 1):
        g = torch.Generator().manual_seed(i)
        copy = {**ckpt, "state_dict": {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                                       for k, v in ckpt["state_dict"].items()}}
        if name.startswith("modern"):
            copy["hyper_parameters"] = {**ckpt["hyper_parameters"], "label_smoothing": 0.1}
            copy["datamodule_hyper_parameters"] = {**ckpt["datamodule_hyper_parameters"], "augment": "autoaugment",
                                                   "cutmix_alpha": 1.0}
        atomic_torch_save(copy, out / f"{name}.ckpt")
        paths[name] = out / f"{name}.ckpt"
    return paths, root


def _direct(path, root, n=20):
    """Independent computation: layer-0 min MAD (grid), early mean entropy, accuracy of one checkpoint."""
    model, _ = load_checkpoint_backbone(path)
    dm = CIFAR100DataModule(data_dir=str(root), download=False)
    dm.setup("test")
    x, y = dm.test_set.images, dm.test_set.targets
    res = attention_locality(model, normalize(x[probe_indices(len(x), n, 0)], dm.mean, dm.std))
    with torch.no_grad():
        acc = 100 * float((model(normalize(x, dm.mean, dm.std)).argmax(-1) == y).float().mean())
    return float(res["mad"].mean(0)[0].min()) / 8, float(res["entropy"].mean(0).mean()), acc


def test_table_over_conditions_and_seeds(checkpoints, tmp_path, monkeypatch, capsys):
    paths, root = checkpoints
    out = tmp_path / "report"
    args = [str(p) for p in paths.values()] + ["--out", str(out), "--num_images", "20", "--device", "cpu",
                                               "--batch_size", "7"]
    rows = locality_cli.main(args)
    assert [r["condition"] for r in rows] == ["Baseline", "Modern"] and [r["runs"] for r in rows] == [2, 2]
    direct = {name: _direct(p, root) for name, p in paths.items()}
    base = [direct["base0"][0], direct["base1"][0]]
    assert rows[0]["min_mad_layer0_mean"] == pytest.approx(np.mean(base), abs=1e-12)
    assert rows[0]["min_mad_layer0_std"] == pytest.approx(np.std(base, ddof=1), abs=1e-12)
    assert rows[1]["mean_entropy_early_mean"] == pytest.approx(np.mean([direct["modern0"][1], direct["modern1"][1]]))
    assert rows[1]["test_acc_mean"] == pytest.approx(np.mean([direct["modern0"][2], direct["modern1"][2]]))
    printed = capsys.readouterr().out
    assert "| Baseline | 2 |" in printed and "±" in printed and "min MAD L0 (grid)" in printed
    for name in ("table.md", "table.csv", "per_checkpoint.csv", "locality.json", "mad_by_layer.png"):
        assert (out / name).is_file()
    per = list(csv.DictReader((out / "per_checkpoint.csv").open()))
    assert len(per) == 4 and float(per[0]["min_mad_layer0"]) == pytest.approx(direct["base0"][0], abs=1e-12)
    data = json.loads((out / "locality.json").read_text())
    assert set(data["tables"]) == {"grid", "diag", "maxdist"} and len(data["records"]) == 4
    assert data["tables"]["diag"][0]["min_mad_layer0_mean"] == pytest.approx(rows[0]["min_mad_layer0_mean"] / 2**0.5)

    # cached: a second run probes nothing again; a LABEL=PATH argument renames one run's condition
    monkeypatch.setattr(locality_cli, "checkpoint_record", lambda *a, **k: pytest.fail("recomputed"))
    rows2 = locality_cli.main([f"Mine={paths['base0']}", *args[1:], "--wandb_project", "p", "--wandb_mode", "offline"])
    assert {r["condition"]: r["runs"] for r in rows2} == {"Baseline": 1, "Modern": 2, "Mine": 1}
    (run,) = (out / "wandb").glob("offline-run-*")  # the picture's W&B run, with the package's kind of run id
    assert re.fullmatch(r"offline-run-\d{8}_\d{6}-r[0-9a-f]{11}", run.name)
    assert rows2[1]["min_mad_early_mean"] == rows[1]["min_mad_early_mean"]


def test_labels_folders_and_help(checkpoints, tmp_path, capsys):
    paths, _ = checkpoints
    run = tmp_path / "runs" / "a" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(paths["modern0"].read_bytes())
    rows = locality_cli.main([f"Mine={paths['base0']}", str(tmp_path / "runs"), "--out", str(tmp_path / "o"),
                              "--num_images", "10", "--no_accuracy", "--device", "cpu"])
    assert {r["condition"]: r["runs"] for r in rows} == {"Modern": 1, "Mine": 1}
    assert all(np.isnan(r["test_acc_mean"]) for r in rows)
    # one run per condition (std undefined) and no accuracy: strict JSON with null, never a NaN token
    text = (tmp_path / "o" / "locality.json").read_text()
    data = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert data["tables"]["grid"][0]["test_acc_mean"] is None and data["tables"]["grid"][0]["min_mad_early_std"] is None
    assert isinstance(data["tables"]["grid"][0]["min_mad_early_mean"], float)
    with pytest.raises(SystemExit) as exit_info:
        package_main(["locality", "--help"])
    assert exit_info.value.code == 0 and "LABEL=PATH" in capsys.readouterr().out


def test_incompatible_and_unsuitable_checkpoints(checkpoints, tmp_path):
    paths, _ = checkpoints
    ckpt = safe_torch_load(paths["base0"])
    from lightning_methods.models import create_backbone

    other = create_backbone("vit_lite_7_4", 100, patch_size=8, **TINY)  # 4x4 token grid
    atomic_torch_save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"],
                                                    "backbone_kwargs": {**TINY, "patch_size": 8}},
                       "state_dict": {f"backbone.{k}": v for k, v in other.state_dict().items()}},
                      tmp_path / "grid4.ckpt")
    common = ["--out", str(tmp_path / "o"), "--num_images", "10", "--no_accuracy", "--device", "cpu"]
    with pytest.raises(ValueError, match="different token grids.*\\[4, 4\\]"):
        locality_cli.main([str(paths["base0"]), str(tmp_path / "grid4.ckpt"), *common])
    cnn = create_backbone("resnet8", 100)
    atomic_torch_save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "backbone": "resnet8",
                                                    "backbone_kwargs": None},
                       "state_dict": {f"backbone.{k}": v for k, v in cnn.state_dict().items()}}, tmp_path / "cnn.ckpt")
    with pytest.raises(ValueError, match="no attention layers"):
        locality_cli.main([str(tmp_path / "cnn.ckpt"), *common])
    broken = {**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items() if "blocks.1" not in k}}
    atomic_torch_save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="missing.*blocks.1"):
        locality_cli.main([str(tmp_path / "broken.ckpt"), *common])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locality_cli.main([str(tmp_path / "nope.ckpt"), *common])
    with pytest.raises(ValueError, match="at most 100"):
        locality_cli.main([str(paths["base0"]), *common[:-5], "--num_images", "1000", "--no_accuracy"])
