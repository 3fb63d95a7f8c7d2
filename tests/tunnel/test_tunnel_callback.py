"""TunnelProbe callback: leaves parameters, BatchNorm statistics and train/eval flags unchanged; periodic probes with
files and W&B entries; the history survives a mid-training resume; bad settings stop at fit start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from tunnel_fakes import logged_text

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import TunnelProbe
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.tunnel import ProbeSettings

from helpers import quiet_trainer

SMALL = ProbeSettings(max_train_samples=200, max_test_samples=120, extract_batch_size=64)


def model(backbone: str = "mlp", **kwargs) -> ImageClassifier:
    kwargs = kwargs or {"depth": 4, "width": 32, "batch_norm": True}
    return ImageClassifier(backbone, 10, backbone_kwargs=kwargs,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))


class Snapshot(Callback):
    """Records the module's state and flags at fit end (placed before and after the probe)."""

    def __init__(self) -> None:
        self.state, self.flags = None, None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.flags = [m.training for m in pl_module.modules()]


def test_probe_leaves_parameters_bn_statistics_and_flags_unchanged(tmp_path, one_thread):
    torch.manual_seed(0)
    m = model("vgg11_3fc", width=0.125, fc_width=16)
    m.backbone.features[0].bn.eval()  # a frozen BN layer stays frozen
    before, after = Snapshot(), Snapshot()
    probe = TunnelProbe(settings=SMALL, output_dir=str(tmp_path))
    trainer = quiet_trainer(max_steps=3, callbacks=[before, probe, after])
    trainer.fit(m, DigitsDataModule(batch_size=32))
    assert len(probe.history) == 1 and len(probe.history[0]["report"]["rows"]) == 11  # 8 conv + 3 FC
    assert before.state.keys() == after.state.keys()
    assert any("running_mean" in k for k in before.state)
    for k, v in before.state.items():
        assert torch.equal(v, after.state[k]), k
    assert before.flags == after.flags
    assert (tmp_path / "tunnel.csv").is_file() and (tmp_path / "tunnel.png").is_file()


def test_periodic_probes_write_files_and_wandb(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    probe = TunnelProbe(settings=SMALL, every_n_epochs=1)
    logger = WandbLogger(project="tunnel-test", save_dir=str(tmp_path), offline=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints", save_last=True)
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe, ckpt], logger=logger, limit_val_batches=1,
                            enable_checkpointing=True)
    trainer.fit(model(), DigitsDataModule(batch_size=64))
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    assert [h["epoch"] for h in probe.history] == [1, 2]  # the fit-end probe reuses the last periodic one
    out = tmp_path / "run" / "tunnel"
    names = {p.name for p in out.iterdir()}
    assert {"tunnel_epoch001.csv", "tunnel_epoch002.json", "tunnel.csv", "tunnel.json", "tunnel.png",
            "tunnel_history.csv", "tunnel_formation.png"} <= names
    lines = (out / "tunnel_history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,global_step,layer") and len(lines) == 1 + 2 * 4
    header = (out / "tunnel.csv").read_text().splitlines()[0]
    assert header == "layer,name,module,dim,acc_id,train_acc_id,acc_ood,train_acc_ood,rank,rank_per_class,in_tunnel"
    run_file = next(run_dir.glob("run-*.wandb"))
    logged = logged_text(run_file)
    for key in ("tunnel/table", "tunnel/plot", "tunnel/formation", "tunnel/tunnel_start_layer"):
        assert key in logged, key


def fit_probe(root: Path, max_epochs: int, ckpt_path: str | None = None) -> TunnelProbe:
    torch.manual_seed(0)
    probe = TunnelProbe(settings=SMALL, every_n_epochs=1, output_dir=str(root / "tunnel"))
    ckpt = ModelCheckpoint(dirpath=root, save_last=True)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[probe, ckpt], enable_checkpointing=True,
                            limit_val_batches=1)
    trainer.fit(model(), DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return probe


def test_resume_keeps_the_probe_history(tmp_path, one_thread):
    straight = fit_probe(tmp_path / "a", 3)
    first = fit_probe(tmp_path / "b", 2)
    stored = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["callbacks"]
    assert [h["epoch"] for h in next(iter(v for k, v in stored.items() if "TunnelProbe" in k))["history"]] == [1, 2]
    resumed = fit_probe(tmp_path / "b", 3, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history[:2]
    for a, b in zip(straight.history, resumed.history):
        rows_a, rows_b = a["report"]["rows"], b["report"]["rows"]
        assert [r["rank"] for r in rows_a] == [r["rank"] for r in rows_b]
        assert [r["acc_id"] for r in rows_a] == pytest.approx([r["acc_id"] for r in rows_b], abs=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(settings=ProbeSettings(points=["layers.9.act"])), ValueError, "no module named 'layers.9.act'"),
    (dict(settings=ProbeSettings(memory_budget_gb=1e-6)), MemoryError, "Options: pool the feature maps"),
    (dict(ood_data=DigitsDataModule(), settings=ProbeSettings(ood_classes=12)), ValueError,
     "ood_classes=12 asks for more classes"),
])
def test_bad_settings_stop_before_training(kwargs, error, match, one_thread):
    trainer = quiet_trainer(max_epochs=1, callbacks=[TunnelProbe(**kwargs)])
    with pytest.raises(error, match=match):
        trainer.fit(model(), DigitsDataModule(batch_size=64))
    assert trainer.global_step == 0


def test_settings_object_and_module_attr(tmp_path, one_thread):
    """``module_attr`` names the network to probe: None probes the LightningModule itself (its module names carry the
    ``backbone.`` prefix), and the same layers give the same numbers as the default ``backbone``."""
    settings = ProbeSettings(max_train_samples=150, max_test_samples=100, extract_batch_size=50, include_head=False,
                             points=["layers.0.act", "layers.2.act"])
    whole = ProbeSettings(**{**settings.__dict__, "points": ["backbone.layers.0.act", "backbone.layers.2.act"]})
    reports = []
    for kind, cfg, attr in (("backbone", settings, "backbone"), ("module", whole, None)):
        torch.manual_seed(0)
        probe = TunnelProbe(settings=cfg, output_dir=str(tmp_path / kind), module_attr=attr, log_wandb=False)
        assert probe.settings is cfg
        quiet_trainer(max_steps=2, callbacks=[probe], limit_val_batches=0).fit(model(), DigitsDataModule(batch_size=64))
        reports.append(probe.history[-1]["report"])
    assert [r["module"] for r in reports[1]["rows"]] == ["backbone.layers.0.act", "backbone.layers.2.act"]
    for a, b in zip(reports[0]["rows"], reports[1]["rows"], strict=True):
        assert a["rank"] == b["rank"] and a["acc_id"] == b["acc_id"] and a["dim"] == b["dim"]
    with pytest.raises(TypeError, match="settings must be a ProbeSettings"):
        TunnelProbe(settings={"max_train_samples": 10})
