"""AttentionLocality: leaves the model exactly as it was, training is unchanged by it, files and W&B entries, state
round trip, same numbers under 2-process DDP as on one process, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from vit_locality_helpers import TINY, RandomImages, tiny_classifier

from lightning_methods.analysis.attention import attention_locality, locality_summary
from lightning_methods.callbacks import AttentionLocality
from lightning_methods.datamodules import IndexedTensorDataset
from lightning_methods.datamodules.transforms import normalize
from lightning_methods.models import create_backbone
from lightning_methods.utils import leave_process_group
from lightning_methods.vit_locality.settings import LocalitySettings

from helpers import quiet_trainer, read_wandb_records, run_ddp

pytestmark = pytest.mark.usefixtures("one_thread")


class Snapshot(Callback):
    """Records weights, buffers and every module's train flag at the end of each training epoch."""

    def __init__(self) -> None:
        self.states: list[tuple[dict, list[bool]]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.states.append((state, [m.training for m in pl_module.modules()]))


def test_probe_leaves_weights_norm_state_and_modes_unchanged(tmp_path):
    """A BatchNorm in front of the ViT (running statistics), one block kept in eval on purpose, train mode: all
    exactly as before the probe (snapshots right before and right after it, at the same hook)."""
    torch.manual_seed(0)
    vit = create_backbone("vit_lite_7_4", 10, **TINY)
    backbone = nn.Sequential(nn.BatchNorm2d(3), vit)
    model = tiny_classifier(backbone=backbone)
    model.backbone[1].blocks[0].eval()
    before, after = Snapshot(), Snapshot()
    settings = LocalitySettings(num_images=12, batch_size=5, grid_size=8, num_prefix_tokens=1, patch_size=4)
    probe = AttentionLocality(settings=settings, every_n_epochs=1, num_map_images=0, out_dir=str(tmp_path))
    trainer = quiet_trainer(max_epochs=1, callbacks=[before, probe, after])
    trainer.fit(model, RandomImages())
    (s0, f0), (s1, f1) = before.states[0], after.states[0]
    assert probe.history and f0 == f1 and any(f0) and not all(f0)
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert int(s0["backbone.0.num_batches_tracked"]) == 3  # the BN did run in training, not in the probe


def test_training_is_identical_with_and_without_the_probe(tmp_path):
    """No weight, mode or RNG side effect: two epochs with a probe after each equal two epochs without."""
    finals = []
    for callbacks in ([], [AttentionLocality(settings=LocalitySettings(num_images=8),
                                             every_n_epochs=1, num_map_images=1, out_dir=str(tmp_path))]):
        model = tiny_classifier(seed=1)
        quiet_trainer(max_epochs=2, callbacks=callbacks).fit(model, RandomImages(cutmix_alpha=1.0,
                                                                                 augment="colorjitter"))
        finals.append(model.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_files_wandb_entries_and_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    probe = AttentionLocality(settings=LocalitySettings(num_images=10, batch_size=4),
                              every_n_epochs=1, num_map_images=2)
    logger = WandbLogger(project="locality-test", save_dir=str(tmp_path / "runs"), offline=True)
    model = tiny_classifier()
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe], logger=logger, enable_checkpointing=True)
    dm = RandomImages()
    trainer.fit(model, dm)
    logger.experiment.finish()
    root = Path(trainer.checkpoint_callback.dirpath).parent / "locality"
    assert sorted(p.name for p in root.glob("epoch_*")) == ["epoch_001", "epoch_002"]  # fit end: no second probe
    out = root / "epoch_002"
    mad, ent = np.load(out / "mad_patch.npy"), np.load(out / "entropy.npy")
    assert mad.shape == ent.shape == (2, 2) and np.load(out / "mad_patch_per_image.npy").shape == (10, 2, 2)
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda t: pytest.fail(f"{t} in JSON"))
    assert summary["settings"]["grid"] == [8, 8] and summary["settings"]["num_images"] == 10
    assert summary["values"]["min_mad_grid/layer0"] == pytest.approx(mad[0].min() / 8)
    assert summary["values"]["mean_entropy/early"] == pytest.approx(ent.mean())
    for png in ("mad_heatmap.png", "layer_curves.png", "attention_maps.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    history = (root / "history.csv").read_text().splitlines()
    assert len(history) == 3 and history[0].startswith("epoch,global_step,min_mad_grid/layer0")
    # the numbers are those of the fixed probe set on the final weights
    idx = np.load(out / "probe_indices.npy")
    x = normalize(dm.test_set.images[torch.from_numpy(idx)], dm.mean, dm.std)
    direct = attention_locality(model.backbone, x)
    np.testing.assert_allclose(mad, direct["mad"].mean(0).numpy(), rtol=0, atol=1e-12)

    records = read_wandb_records(next((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")))
    items = [i for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item]
    keys = {i.key or "/".join(i.nested_key) for i in items}
    assert {"locality/min_mad_grid/layer0", "locality/mad_diag/L1H1", "locality/entropy/L0H0"} <= keys
    images = [i for i in items if (i.key or "/".join(i.nested_key)).startswith("locality/mad_heatmap")]
    assert images and any("image" in i.value_json for i in images)

    fresh = AttentionLocality(settings=LocalitySettings(num_images=10, batch_size=4), every_n_epochs=1)
    fresh.load_state_dict(probe.state_dict())
    assert fresh.history == probe.history and len(fresh.history) == 2 and fresh.state_key == probe.state_key


def test_resume_continues_the_history(tmp_path):
    """Stopping after one epoch and resuming from last.ckpt gives the same probes as an uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_epochs: int, folder: str, ckpt_path: str | None = None) -> AttentionLocality:
        probe = AttentionLocality(settings=LocalitySettings(num_images=6),
                                  every_n_epochs=1, num_map_images=0, out_dir=str(tmp_path / folder))
        ckpt = ModelCheckpoint(dirpath=tmp_path / folder / "ckpt", save_last=True)
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[probe, ckpt], enable_checkpointing=True)
        trainer.fit(tiny_classifier(seed=2), RandomImages(cutmix_alpha=1.0), ckpt_path=ckpt_path)
        return probe

    full = run(2, "full")
    run(1, "part")
    resumed = run(2, "part", str(tmp_path / "part" / "ckpt" / "last.ckpt"))
    assert len(full.history) == 2 and resumed.history == full.history
    assert len((tmp_path / "part" / "history.csv").read_text().splitlines()) == 3


def _probe_in_process(rank: int, world: int, images: torch.Tensor, out: str) -> dict:
    if world > 1:
        torch.distributed.init_process_group("gloo")
    model = tiny_classifier(seed=3)
    dm = SimpleNamespace(test_set=IndexedTensorDataset(images, torch.zeros(len(images), dtype=torch.long)),
                         mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    trainer = SimpleNamespace(datamodule=dm, world_size=world, global_rank=rank, is_global_zero=rank == 0,
                              global_step=7, current_epoch=0, loggers=[], checkpoint_callback=None,
                              default_root_dir=out)
    probe = AttentionLocality(settings=LocalitySettings(num_images=11, seed=5, batch_size=2),
                              num_map_images=0, out_dir=out)
    probe.on_fit_start(trainer, model)
    summary = probe.probe(trainer, model, epochs_done=1)
    leave_process_group()
    return summary


def test_same_numbers_under_two_process_ddp(tmp_path):
    """Each rank probes a shard of an odd-sized probe set (the padding sampler would duplicate one image); the
    gathered numbers equal one process's, on every rank."""
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    single = _probe_in_process(0, 1, images, str(tmp_path / "single"))
    ranks = run_ddp(_probe_in_process, 2, (images, str(tmp_path / "ddp")))
    for summary in ranks:
        assert summary.keys() == single.keys()
        for k, v in single.items():
            assert summary[k] == pytest.approx(v, abs=1e-12)
    assert (tmp_path / "ddp" / "epoch_001" / "summary.json").is_file()
    model = tiny_classifier(seed=3)  # independent check of one value
    idx = torch.randperm(30, generator=torch.Generator().manual_seed(5))[:11].sort().values
    direct = attention_locality(model.backbone, normalize(images[idx], (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    expected = locality_summary(direct["mad"].mean(0), direct["entropy"].mean(0), 8)
    assert single["min_mad_grid/early"] == pytest.approx(expected["min_mad_grid/early"], abs=1e-12)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="at most 40"):
        quiet_trainer(max_epochs=1, callbacks=[AttentionLocality(settings=LocalitySettings(num_images=1000),
                                                                 out_dir=str(tmp_path))]).fit(
            tiny_classifier(), RandomImages())
    from lightning_methods import ImageClassifier

    cnn = ImageClassifier(backbone="resnet8", num_classes=10)
    with pytest.raises(ValueError, match="no attention layers"):
        probe = AttentionLocality(settings=LocalitySettings(num_images=4), out_dir=str(tmp_path))
        quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[probe]).fit(cnn, RandomImages())
    with pytest.raises(ValueError, match="every_n_epochs"):
        AttentionLocality(every_n_epochs=0)
    with pytest.raises(ValueError, match="split must be"):
        LocalitySettings(split="train")
    with pytest.raises(ValueError, match="batch_size and num_images must be positive"):
        LocalitySettings(num_images=0)
    with pytest.raises(TypeError, match="settings must be a LocalitySettings"):
        AttentionLocality(settings={"num_images": 10})


def _fit_ddp(rank: int, world: int, out: str) -> dict:
    model = tiny_classifier(seed=4)
    probe = AttentionLocality(settings=LocalitySettings(num_images=9, batch_size=2),
                              every_n_epochs=1, num_map_images=1, out_dir=out)
    trainer = quiet_trainer(max_epochs=1, devices=world, strategy="ddp", callbacks=[probe])
    trainer.fit(model, RandomImages(cutmix_alpha=1.0))
    return {"history": probe.history, "state": {k: v.cpu() for k, v in model.backbone.state_dict().items()}}


@pytest.mark.slow
def test_callback_inside_a_ddp_trainer(tmp_path):
    """With Lightning's DDP strategy: identical history on both ranks, equal to one process probing the final
    weights."""
    ranks = run_ddp(_fit_ddp, 2, (str(tmp_path),))
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) == 1
    model = tiny_classifier(seed=4)
    model.backbone.load_state_dict(ranks[0]["state"])
    dm = RandomImages()
    dm.setup("test")
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:9].sort().values
    direct = attention_locality(model.backbone, normalize(dm.test_set.images[idx], dm.mean, dm.std))
    expected = locality_summary(direct["mad"].mean(0), direct["entropy"].mean(0), 8)
    assert ranks[0]["history"][0]["min_mad_grid/layer0"] == pytest.approx(expected["min_mad_grid/layer0"], abs=1e-10)
    assert (tmp_path / "epoch_001" / "attention_maps.png").is_file()
