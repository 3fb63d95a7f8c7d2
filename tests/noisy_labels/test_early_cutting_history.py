"""PredictionHistoryCallback and TestAccuracyTracker inside real fits: identical state on 2 DDP ranks (gathered,
deduplicated despite sampler padding), and a resumed fit gives exactly the history of an uninterrupted one."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_methods import CoTrainingClassifier
from lightning_methods.callbacks import PredictionHistoryCallback, TestAccuracyTracker
from lightning_methods.callbacks.prediction_history import prepare_images
from lightning_methods.datamodules import NoisyDigitsDataModule

from helpers import TinyNet, quiet_trainer, run_ddp

pytestmark = pytest.mark.usefixtures("one_thread")


def _parts(n_train: int, augment: str = "none", **history_kw):
    seed_everything(0)
    dm = NoisyDigitsDataModule(noise_type="sym", noise_rate=0.4, batch_size=16, eval_batch_size=64, augment=augment)
    dm.setup()
    dm.set_train_subset(dm.train_set.indices[:n_train].tolist())
    model = CoTrainingClassifier(TinyNet(10, 8), num_classes=10,
                                 optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    kw = {"warm_up_epochs": 0, "k": 2, "keep_rate": None, **history_kw}
    history = PredictionHistoryCallback(store_predictions=True, history_transform="train", **kw)
    return dm, model, history, TestAccuracyTracker()


def _trainer(max_epochs: int, callbacks: list, **kw) -> Trainer:
    return quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, **{"limit_val_batches": 1.0,
                                                                        "enable_checkpointing": True, **kw})


def _ddp_fit(rank: int, world_size: int) -> dict:
    # 101 samples (odd: the distributed sampler pads one rank); the stop rule fires but training goes on
    dm, model, history, tracker = _parts(101, k=1, keep_rate=0.05, lag=0, stop_training=False)
    trainer = _trainer(3, [history, tracker], devices=world_size, strategy="ddp", enable_checkpointing=False)
    trainer.fit(model, dm)
    model.eval()
    ds = dm.train_set
    with torch.no_grad():  # the final model's predictions on every training sample, computed locally
        local_logits = model(prepare_images({"image": ds.images}, dm, augment=False))
        local = local_logits.argmax(-1)
        top2 = local_logits.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        test = dm.test_set
        test_hits = model(prepare_images({"image": test.images}, dm, False)).argmax(-1) == test.targets
    return {"history": history.state_dict(), "train_indices": ds.indices, "local_preds": local, "margin": margin,
            "tracker": tracker.state_dict(), "local_test_hits": test_hits}


def test_ddp_ranks_hold_identical_histories():
    r0, r1 = run_ddp(_ddp_fit, world_size=2)
    h0, h1 = r0["history"], r1["history"]
    assert torch.equal(h0["indices"], r0["train_indices"])  # every sample exactly once, padding removed
    for key in ("indices", "targets", "clean_targets"):
        assert torch.equal(h0[key], h1[key])
    for key in ("prev_pred", "streak", "first_epoch"):
        assert torch.equal(h0["counters"][key], h1["counters"][key])
    assert h0["stop_epoch"] is not None and h0["stop_epoch"] == h1["stop_epoch"]
    assert torch.equal(h0["selection"], h1["selection"]) and len(h0["selection"]) >= 5
    assert h0["recorded_epochs"] == h1["recorded_epochs"] == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(h0["predictions"], h1["predictions"]))
    # the gathered last-epoch record equals what the rank that predicted each sample computes locally with its final
    # model (history_transform="train" with augment="none": no augmentation). The weights are synchronized, the
    # BatchNorm running statistics are per rank (DDP does not sync buffers), so each sample is compared with the
    # rank whose shard held it: the unshuffled DistributedSampler gives rank r the positions r, r + 2, ...
    last, n = h0["predictions"][-1].long(), len(r0["local_preds"])
    for rank, r in enumerate((r0, r1)):
        assert torch.equal(last[rank:n:2], r["local_preds"][rank:n:2])
    clear = (r0["margin"] > 1e-2) & (r1["margin"] > 1e-2)  # where rank-local BN statistics cannot flip the argmax
    assert clear.float().mean() > 0.5 and torch.equal(r0["local_preds"][clear], r1["local_preds"][clear])
    assert r0["tracker"] == r1["tracker"]
    hits, m = r0["local_test_hits"].clone(), len(r0["local_test_hits"])
    hits[1:m:2] = r1["local_test_hits"][1:m:2]  # each test sample as predicted by the rank that held it
    assert abs(r0["tracker"]["history"][-1]["test_acc"] - hits.float().mean().item()) < 1e-6


def test_resumed_fit_has_the_history_of_an_uninterrupted_one(tmp_path):
    dm, model, history, tracker = _parts(160, augment="crop")  # augmented history pass, seeded per epoch
    _trainer(5, [history, tracker], enable_checkpointing=False).fit(model, dm)

    dm, model, first_history, first_tracker = _parts(160, augment="crop")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=True)
    _trainer(3, [first_history, first_tracker, ckpt]).fit(model, dm)
    dm, model, resumed, resumed_tracker = _parts(160, augment="crop")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=True)
    _trainer(5, [resumed, resumed_tracker, ckpt]).fit(model, dm, ckpt_path=str(tmp_path / "last.ckpt"))

    assert resumed.recorded_epochs == history.recorded_epochs == [1, 2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(resumed.predictions, history.predictions))
    assert torch.equal(resumed.counters["first_epoch"], history.counters["first_epoch"])
    assert resumed_tracker.state_dict() == tracker.state_dict()
    summary = tracker.summary()
    best = max(tracker.history, key=lambda h: h["monitor"])
    assert summary["acc_last"] == tracker.history[-1]["test_acc"] and summary["acc_at_best_val"] == best["test_acc"]
    assert summary["acc_max"] == max(h["test_acc"] for h in tracker.history)


class _Recorder(torch.nn.Module):
    """A fixed linear classifier that records the inputs it is given (in call order)."""

    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, classes, generator=torch.Generator().manual_seed(0)))
        self.inputs: list[torch.Tensor] = []
        self.device = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return x.flatten(1) @ self.w


def test_history_transform_train_replicates_the_training_augmentation_and_eval_does_not():
    """Spec pitfall: the official history predicts the training set WITH the training augmentation (default "train");
    "eval" predicts the stored images, normalized, with neither the worker transform nor the on-device crop + flip."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from lightning_methods.datamodules import IndexedTensorDataset
    from lightning_methods.datamodules.transforms import normalize

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    targets, base = torch.randint(0, 3, (20,), generator=g), torch.arange(20) * 2 + 1
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ds = IndexedTensorDataset(images, targets, base, transform=lambda img: 255 - img)  # a worker-side augmentation
    dm = SimpleNamespace(train_set=ds, mean=mean, std=std, augment="standard", eval_batch_size=8, num_workers=0)
    trainer = SimpleNamespace(datamodule=dm, global_rank=0, world_size=1, fast_dev_run=False,
                              strategy=SimpleNamespace(precision_plugin=SimpleNamespace(forward_context=nullcontext)))
    clean = normalize(images, mean, std)

    def run(transform: str, epoch: int) -> torch.Tensor:
        model = _Recorder(3 * 8 * 8, 3).train()
        index, pred, target, _ = PredictionHistoryCallback(history_transform=transform, seed=3).predict_training_set(
            trainer, model, epoch)
        assert torch.equal(index, base) and torch.equal(target, targets) and model.training  # train mode restored
        x = torch.cat(model.inputs)
        assert torch.equal(pred, (x.flatten(1) @ model.w).argmax(-1))
        return x

    assert torch.equal(run("eval", 7), clean)
    train = run("train", 7)
    assert not torch.equal(train, clean) and not torch.equal(train, normalize(255 - images, mean, std))
    assert torch.equal(run("train", 7), train)  # the crop + flip is seeded by (seed, epoch)
    assert not torch.equal(run("train", 8), train)
    dm.augment = "none"  # no on-device crop + flip: "train" shows the worker transform alone, "eval" never does
    assert torch.equal(run("train", 7), normalize(255 - images, mean, std))
    assert torch.equal(run("eval", 7), clean)
