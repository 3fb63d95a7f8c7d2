"""The tunnel probe under DDP (2 CPU processes, gloo): shards padded by the DistributedSampler are gathered by sample
index without duplicates, each layer is probed on one rank, and every rank ends with the table of one process: for the
prober in a plain process group, for the TunnelProbe callback under ``Trainer(strategy="ddp")`` and for the probe
command started as torchrun starts it (it joins a group of its own and leaves it)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from lightning_methods import ImageClassifier
from lightning_methods.datamodules import DigitsDataModule, IndexedTensorDataset
from lightning_methods.models import create_backbone
from lightning_methods.tunnel import ProbeData, ProbeSettings, TunnelProber, class_subset
from lightning_methods.tunnel.cli import run_probe_command
from lightning_methods.tunnel.data import image_preparer
from lightning_methods.utils import leave_process_group

from helpers import next_group_port, quiet_trainer, run_ddp


def synthetic(n: int, classes: int, seed: int) -> IndexedTensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 80 + y[:, None, None, None] * 15).to(torch.uint8)
    return IndexedTensorDataset(x, y)


def probe_once() -> dict:
    torch.manual_seed(0)
    model = create_backbone("mlp", 5, depth=5, width=24)
    data = ProbeData("toy", synthetic(61, 5, 0), synthetic(33, 5, 1), 5)  # odd sizes: the sampler pads shards
    ood = class_subset(ProbeData("toy8", synthetic(45, 8, 2), synthetic(27, 8, 3), 8), 4, seed=1)
    # Adam: its per-epoch sample orders are a function of the index, so the two layouts are bit-identical; the L-BFGS
    # default sums the full-batch loss in row order, which differs between the gathered and the local features
    settings = ProbeSettings(max_train_samples=57, probe_epochs=4, probe_batch_size=16, extract_batch_size=8,
                             probe_solver="adam",
                             feature_dtype="float16", ood_classes=4)
    prepare = image_preparer(SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3), torch.device("cpu"))
    return TunnelProber(settings).run(model, data, prepare, ood).to_dict()


def fit_with_probe(devices: int) -> dict:
    import lightning as L

    from lightning_methods import ImageClassifier
    from lightning_methods.callbacks import TunnelProbe
    from lightning_methods.datamodules import DigitsDataModule

    torch.manual_seed(0)
    model = ImageClassifier("mlp", 10, backbone_kwargs={"depth": 4, "width": 16},
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # same weights with 1 or 2 processes
    probe = TunnelProbe(settings=ProbeSettings(max_train_samples=301, max_test_samples=99, probe_epochs=3,
                                               extract_batch_size=32, ood_classes=3, probe_solver="adam"),
                        ood_data=DigitsDataModule(), log_wandb=False)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[probe])
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return probe.history[-1]["report"]


def probe_command(ckpt: str, out: str) -> dict:
    """``lightning-methods probe`` on ``ckpt``; under torchrun's variables it joins and then leaves its own group."""
    return run_probe_command(["--ckpt", ckpt, "--data", "DigitsDataModule", "--wandb_mode", "disabled", "--output_dir",
                              out, "--probe.max_train_samples", "200", "--probe.probe_epochs", "2",
                              "--probe.extract_batch_size", "64", "--probe.probe_solver", "adam"]).to_dict()


def _worker(rank: int, world_size: int, ckpt: str, out: str) -> tuple[dict, dict, dict]:
    command = probe_command(ckpt, out)
    assert not dist.is_initialized()  # the command left the group it started
    next_group_port()
    dist.init_process_group("gloo")
    try:
        direct = probe_once()
    finally:
        leave_process_group()
    next_group_port()
    return direct, fit_with_probe(world_size), command  # the callback under Trainer(strategy="ddp") joins its own


def test_ddp_table_equals_one_process(tmp_path, monkeypatch, one_thread):
    """One spawn for three checks: the probe command as torchrun starts it, the prober in a plain process group, and
    the callback under the ddp strategy."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(ImageClassifier("mlp", 10, backbone_kwargs={"depth": 3, "width": 16}), DigitsDataModule(batch_size=64))
    ckpt = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(ckpt)
    (r0, fit0, cmd0), (r1, fit1, cmd1) = run_ddp(_worker, world_size=2, args=(ckpt, str(tmp_path / "ddp")),
                                                    groups=3)
    cmd_single = probe_command(ckpt, str(tmp_path / "single"))
    assert cmd0["rows"] == cmd1["rows"] == cmd_single["rows"] and cmd0["summary"]["world_size"] == 2
    assert (tmp_path / "ddp" / "tunnel.csv").read_text() == (tmp_path / "single" / "tunnel.csv").read_text()
    single = probe_once()
    assert r0 == r1  # identical on every rank (broadcast from rank 0)
    assert r0["summary"]["world_size"] == 2
    assert r0["summary"]["samples"] == single["summary"]["samples"] == {
        "id_train": 57, "id_test": 33, "ood_train": single["summary"]["samples"]["ood_train"],
        "ood_test": single["summary"]["samples"]["ood_test"]}
    keys = ("layer", "name", "dim", "rank", "acc_id", "train_acc_id", "acc_ood", "train_acc_ood", "in_tunnel")
    for a, b in zip(r0["rows"], single["rows"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    for key in ("tunnel_start_layer", "elbow_layer", "ood_peak_layer", "ood_retained_pct"):
        assert r0["summary"][key] == single["summary"][key]
    fit_single = fit_with_probe(1)
    assert fit0["rows"] == fit1["rows"] == fit_single["rows"]
    assert fit0["summary"]["samples"] == fit_single["summary"]["samples"] and fit0["summary"]["world_size"] == 2
