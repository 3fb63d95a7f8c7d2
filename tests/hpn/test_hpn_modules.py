"""HPNClassifier / HPNRegressor / HPNMultiTask: prototypes as a frozen buffer, the sum-reduced loss inside the closure
contract, checkpoints (round trip without the prototype file, resume), bounds, bad input, learning on small data."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_methods.hpn import HPNClassifier, HPNMultiTask, HPNRegressor, build_prototypes, save_prototypes
from lightning_methods.losses.hpn import hpn_classification_loss, prototype_cosines

from helpers import quiet_trainer

K, D = 4, 3


def flat_net(out: int, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, out))


class ToyData(Dataset):
    """Float images whose class and real target are readable from the pixels (learnable in a few steps)."""

    def __init__(self, n: int = 64, seed: int = 0, float_target_only: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.target = torch.arange(n) % K
        self.value = torch.rand(n, generator=g) * 10 + 5  # in [5, 15]
        img = torch.randn(n, 3, 4, 4, generator=g) * 0.1
        img[torch.arange(n), self.target % 3, self.target // 3, 0] += 2.0
        img[:, :, 3, 3] += (self.value.view(-1, 1) - 10) / 5
        self.image, self.float_only = img, float_target_only

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.float_only:
            return {"image": self.image[i], "target": self.value[i], "index": torch.tensor(i)}
        return {"image": self.image[i], "target": self.target[i], "regression_target": self.value[i],
                "index": torch.tensor(i)}


def loader(ds: Dataset, batch: int = 16) -> DataLoader:
    return DataLoader(ds, batch_size=batch, shuffle=False)


def classifier(**kw) -> HPNClassifier:
    args = dict(backbone=flat_net(D), num_classes=K, prototype_dims=D, prototype_iterations=200,
                optimizer=partial(torch.optim.SGD, lr=0.05))
    args.update(kw)
    return HPNClassifier(**args)


def test_prototypes_are_a_frozen_buffer(one_thread):
    model = classifier()
    assert all(p is not model.prototypes for p in model.parameters())
    assert "prototypes" in model.state_dict() and not model.prototypes.requires_grad
    torch.testing.assert_close(model.prototypes, build_prototypes(K, D, 200))
    before = model.prototypes.clone()
    weights = model.backbone[1].weight.detach().clone()
    quiet_trainer(max_steps=3).fit(model, loader(ToyData()))
    assert torch.equal(model.prototypes, before)
    assert not torch.equal(model.backbone[1].weight, weights)


def test_sum_reduction_inside_the_closure(one_thread):
    """The closure back-propagates the mean of the returned vector: that mean is the official sum over the batch."""
    model = classifier()
    batch = next(iter(loader(ToyData(), 16)))
    losses, logits = model.forward_loss(batch)
    out = model(batch["image"])
    expected = hpn_classification_loss(out, model.prototypes, batch["target"], "sum")
    torch.testing.assert_close(losses.mean(), expected)
    torch.testing.assert_close(logits, prototype_cosines(out, model.prototypes))
    with pytest.warns(UserWarning, match="lr is tuned for a sum|multiply the lr by the batch size"):
        mean_model = classifier(reduction="mean")
    torch.testing.assert_close(mean_model.forward_loss(batch)[0].mean(),
                               hpn_classification_loss(out, model.prototypes, batch["target"], "mean"))


def test_accuracy_is_nearest_prototype(one_thread):
    model = classifier()
    batch = next(iter(loader(ToyData(), 32)))
    pred = model.predict_step(batch, 0)
    out = model(batch["image"])
    cos = nn.functional.normalize(out, dim=1) @ model.prototypes.t()
    assert torch.equal(pred["pred"], cos.argmax(1))
    model.test_metrics.update(model.scores(out), batch["target"])
    acc = float(model.test_metrics.compute()["test/acc"])
    assert acc == pytest.approx(float((cos.argmax(1) == batch["target"]).float().mean()))


def test_checkpoint_round_trip_without_the_prototype_file(tmp_path, one_thread):
    protos = build_prototypes(K, D, 50, seed=9)
    path = save_prototypes(tmp_path / "prototypes-3d-4c.npy", protos)
    model = classifier(prototype_file=str(path), backbone="hpn_resnet8")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path)
    data = ToyData()
    trainer.fit(model, loader(data))
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    path.unlink()  # the checkpoint alone must be enough
    loaded = HPNClassifier.load_from_checkpoint(ckpt)
    assert loaded.hparams.prototype_file == str(path) and loaded.hparams.prototype_source == "checkpoint"
    assert loaded.hparams.backbone == "hpn_resnet8" and loaded.hparams.prototype_dims == D
    assert torch.equal(loaded.prototypes, protos)
    batch = next(iter(loader(data)))
    model.eval()
    loaded.eval()
    assert torch.equal(model.predict_step(batch, 0)["cosines"], loaded.predict_step(batch, 0)["cosines"])
    other = classifier(prototype_iterations=60, backbone="hpn_resnet8")  # built from another configuration
    with pytest.warns(UserWarning, match="checkpoint's prototypes differ"):
        other.on_load_checkpoint(torch.load(ckpt, weights_only=True))
    unloaded = HPNClassifier(backbone=flat_net(D), num_classes=K, prototype_dims=D, prototype_source="checkpoint")
    with pytest.raises(RuntimeError, match="never loaded"):
        unloaded.scores(torch.randn(2, D))


def test_multitask_resume_gives_the_same_next_step(tmp_path, one_thread):
    def make():
        return HPNMultiTask(task_weight=0.25, backbone=flat_net(1 + D), num_classes=K, prototype_dims=D,
                            prototype_iterations=100, bounds=(5.0, 15.0),
                            optimizer=partial(torch.optim.SGD, lr=0.02, momentum=0.9))

    data = loader(ToyData())
    full = make()
    quiet_trainer(max_epochs=2).fit(full, data)
    first = make()
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(first, data)
    trainer.save_checkpoint(tmp_path / "e1.ckpt")
    resumed = make()
    quiet_trainer(max_epochs=2).fit(resumed, data, ckpt_path=tmp_path / "e1.ckpt")
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded = HPNMultiTask.load_from_checkpoint(tmp_path / "e1.ckpt", backbone=flat_net(1 + D))
    assert loaded.bounds == first.bounds and loaded.task_weight == 0.25


def test_regressor_learns_from_a_float_target(one_thread):
    """Generic data: only a real-valued "target"; bounds given; MAE falls below the constant predictor's."""
    data = ToyData(96, float_target_only=True)
    model = HPNRegressor(backbone=flat_net(2), output_dims=2, bounds=(5.0, 15.0),
                         optimizer=partial(torch.optim.SGD, lr=0.02, momentum=0.9))
    trainer = quiet_trainer(max_epochs=15)
    trainer.fit(model, loader(data))
    mae = trainer.test(model, loader(ToyData(64, seed=1, float_target_only=True)), verbose=False)[0]["test/mae"]
    baseline = float((data.value - data.value.mean()).abs().mean())
    assert mae < 0.5 * baseline
    pred = model.predict_step(next(iter(loader(data))), 0)["pred"]
    assert pred.min() >= 5.0 and pred.max() <= 15.0  # always inside the bounds


def test_multitask_learns_both_tasks(one_thread):
    model = HPNMultiTask(task_weight=0.5, backbone=flat_net(1 + D), num_classes=K, prototype_dims=D,
                         prototype_iterations=200, bounds=(5.0, 15.0),
                         optimizer=partial(torch.optim.SGD, lr=0.02, momentum=0.9))
    trainer = quiet_trainer(max_epochs=15)
    trainer.fit(model, loader(ToyData(96)))
    res = trainer.test(model, loader(ToyData(64, seed=1)), verbose=False)[0]
    assert res["test/acc"] > 0.9 and res["test/mae"] < 1.5  # chance: 0.25 accuracy, MAE about 2.5
    assert {"test/loss_c", "test/loss_r", "test/rmse", "test/acc_top5"} <= set(res)


@pytest.mark.parametrize("kind", ["multitask", "regressor"])
def test_float64_predictions_are_exact(kind):
    """A float64 model predicts in float64: value = lo + (cos(o, e_1) + 1) / 2 (hi - lo) from the unrounded output
    (HPNMultiTask used to compute it from a float32 copy of the output, off by about 1e-6 here)."""
    lo, hi = 5.0, 15.0
    if kind == "multitask":
        model = HPNMultiTask(task_weight=0.25, backbone=flat_net(1 + D), num_classes=K, prototype_dims=D,
                             prototype_iterations=100, bounds=(lo, hi))
        key = "value"
    else:
        model = HPNRegressor(backbone=flat_net(2), output_dims=2, bounds=(lo, hi))
        key = "pred"
    model = model.double().eval()
    batch = next(iter(loader(ToyData(32), 32)))
    batch["image"] = batch["image"].double()
    with torch.no_grad():
        out = model.predict_step(batch, 0)
        o = model(batch["image"])
    assert out["output"].dtype == torch.float64 and torch.equal(out["output"], o)
    cos = o[:, 0] / o.norm(dim=1)  # independent of F.cosine_similarity
    expected = lo + (cos + 1) / 2 * (hi - lo)
    assert out[key].dtype == torch.float64
    # float64: a few ulps of cos (|cos| <= 1, eps = 2.2e-16) times (hi - lo) / 2 = 5: 16 ulps -> 1.8e-14
    torch.testing.assert_close(out[key], expected, rtol=0, atol=16 * 2.2e-16 * (hi - lo) / 2)
    rounded = lo + (o.float().double()[:, 0] / o.float().double().norm(dim=1) + 1) / 2 * (hi - lo)
    assert (rounded - expected).abs().max() > 1e-9  # the float32 path would fail the tolerance above


class BoundsData:
    """A minimal DataModule stand-in exposing ``regression_bounds`` (what setup reads)."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def regression_bounds(self) -> tuple[float, float]:
        return self.lo, self.hi


def test_bounds_from_data_and_out_of_bounds_targets():
    model = HPNRegressor(backbone=flat_net(2), bounds=None)
    with pytest.raises(RuntimeError, match="no regression bounds yet"):
        model.predict_values(torch.zeros(1))
    model._trainer = type("T", (), {"datamodule": BoundsData(2.0, 8.0)})()
    model.setup("fit")
    assert model.bounds == (2.0, 8.0) and model.hparams.bounds == [2.0, 8.0]
    narrow = HPNRegressor(backbone=flat_net(2), bounds=(3.0, 8.0))
    narrow._trainer = type("T", (), {"datamodule": BoundsData(2.0, 8.0)})()
    with pytest.raises(ValueError, match=r"span \[2.0, 8.0\], outside bounds \(3.0, 8.0\).*clip_targets"):
        narrow.setup("fit")
    clipped = HPNRegressor(backbone=flat_net(2), bounds=(3.0, 8.0), clip_targets=True)
    clipped._trainer = narrow._trainer
    clipped.setup("fit")
    assert clipped.cosine_targets(torch.tensor([1.0, 3.0, 9.0])).tolist() == [-1.0, -1.0, 1.0]
    # evaluation targets beyond the bounds: the prediction saturates, the error counts in full
    assert clipped.predict_values(torch.tensor([1.0])).item() == 8.0
    nodata = HPNRegressor(backbone=flat_net(2))
    nodata._trainer = type("T", (), {"datamodule": None})()
    with pytest.raises(ValueError, match="needs regression bounds"):
        nodata.setup("fit")


def test_bad_input(tmp_path):
    np.save(tmp_path / "p.npy", build_prototypes(K, 5, 20).numpy())
    with pytest.raises(ValueError, match=r"p.npy holds shape \(4, 5\), but the model needs .*\(4, 3\)"):
        classifier(prototype_file=str(tmp_path / "p.npy"))
    with pytest.raises(FileNotFoundError, match="lightning-methods prototypes"):
        classifier(prototype_file=str(tmp_path / "missing.npy"))
    with pytest.raises(ValueError, match="prototype_dims must be >= 2"):
        classifier(prototype_dims=1)
    for t in (-0.01, 1.01):
        with pytest.raises(ValueError, match="task_weight t must be in"):
            HPNMultiTask(task_weight=t, backbone=flat_net(4), num_classes=K, prototype_dims=D)
    with pytest.raises(ValueError, match="label smoothing"):
        classifier(label_smoothing=0.1)
    with pytest.raises(ValueError, match="lower < upper"):
        HPNRegressor(backbone=flat_net(2), bounds=(3.0, 3.0))
    with pytest.raises(ValueError, match="output_dims must be >= 2"):
        HPNRegressor(output_dims=1)
    model = classifier(backbone=flat_net(5))
    with pytest.raises(ValueError, match=r"must be \(batch, 3\)"):
        model.forward_loss(next(iter(loader(ToyData()))))
    batch = next(iter(loader(ToyData())))
    batch["soft_target"] = torch.zeros(16, K)
    with pytest.raises(ValueError, match="soft targets"):
        classifier().forward_loss(batch)
    reg = HPNRegressor(backbone=flat_net(2), bounds=(0.0, 1.0), regression_key="age")
    with pytest.raises(KeyError, match="'age'"):
        reg.regression_values({"image": torch.zeros(1), "target": torch.tensor([1])})


def test_semantic_priors_through_the_module(tmp_path):
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(K, 6)))
    plain = classifier(prototype_iterations=50)
    prior = classifier(prototype_iterations=50, class_embeddings=str(emb), semantic_neighbours=1)
    assert not torch.equal(plain.prototypes, prior.prototypes)
    assert prior.hparams.class_embeddings == str(emb)
