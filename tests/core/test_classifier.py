"""ImageClassifier: the closure contract, BatchNorm handling across closure calls, guards, schedulers, clipping."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_methods import ImageClassifier
from lightning_methods.classifier import soft_cross_entropy

from helpers import TinyNet, quiet_trainer


def batches(n_batches: int = 3, bs: int = 8, classes: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(bs, 3, 8, 8, generator=g), "target": torch.randint(0, classes, (bs,), generator=g),
             "index": torch.arange(i * bs, (i + 1) * bs)} for i in range(n_batches)]


def loader(data: list[dict]) -> DataLoader:
    return DataLoader(data, batch_size=None, shuffle=False)


trainer = quiet_trainer


class TwoPassSGD(torch.optim.SGD):
    """Evaluates the closure twice per step (like SAM) and records what it returned."""

    supports_grad_scaler = False

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr=lr)
        self.returned = []

    def step(self, closure=None):
        with torch.enable_grad():
            first = closure()
            second = closure()
        self.returned.append((first, second))
        return super().step()


class LazyOptimizer(torch.optim.SGD):
    def step(self, closure=None):
        return None


def test_one_step_with_sgd_equals_a_hand_written_step():
    L.seed_everything(0)
    net = TinyNet(4)
    reference = copy.deepcopy(net)
    lr, mom, wd = 0.1, 0.9, 5e-4
    model = ImageClassifier(net, num_classes=4,
                            optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=mom, weight_decay=wd))
    data = batches(1)
    trainer(max_steps=1).fit(model, loader(data))
    loss = F.cross_entropy(reference(data[0]["image"]), data[0]["target"])
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    with torch.no_grad():
        for p, g in zip(reference.parameters(), grads):
            p -= lr * (g + wd * p)  # first momentum step: buffer = gradient
    for (name, a), b in zip(net.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert torch.allclose(net.bn.running_mean, reference.bn.running_mean)  # BN stats updated once, as in one pass


def test_second_closure_call_freezes_bn_and_metrics_and_logging_use_the_first():
    L.seed_everything(0)
    data = batches(3)
    single = TinyNet(4)
    double = copy.deepcopy(single)
    trainer(max_steps=3).fit(ImageClassifier(single, 4, optimizer=lambda p: torch.optim.SGD(p, lr=0.0)), loader(data))
    opt_holder = {}

    def make(p):
        opt_holder["opt"] = TwoPassSGD(p, lr=0.0)
        return opt_holder["opt"]

    model = ImageClassifier(double, 4, optimizer=make)
    tr = trainer(max_steps=3)
    tr.fit(model, loader(data))
    assert tr.global_step == 3
    # lr 0: weights never move, so equal running stats prove that only the first pass updated them
    assert torch.equal(double.bn.running_mean, single.bn.running_mean)
    assert torch.equal(double.bn.running_var, single.bn.running_var)
    assert int(double.bn.num_batches_tracked) == 3
    first, second = opt_holder["opt"].returned[-1]
    assert first.shape == (8,) and not first.requires_grad
    # the second pass normalizes with batch statistics too, so with lr 0 both passes see the same loss
    assert torch.allclose(first, second)
    assert torch.isclose(tr.callback_metrics["train/loss_step"], first.mean())


def test_bn_bypass_can_be_switched_off_as_in_the_official_sam_scripts():
    data = batches(1)
    net = TinyNet(4)
    model = ImageClassifier(net, 4, optimizer=lambda p: TwoPassSGD(p, lr=0.0), bn_bypass_second_pass=False)
    trainer(max_steps=1).fit(model, loader(data))
    assert int(net.bn.num_batches_tracked) == 2  # both passes updated the running statistics


class FreshBatches(torch.utils.data.Dataset):
    """Batches made on access (a list of batches would keep every one alive)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        return batches(1, seed=i)[0]


@pytest.mark.parametrize("passes", [1, 2])
def test_a_step_frees_its_batch_by_reference_counting(passes):
    """The step's closure is no reference cycle: with the cyclic garbage collector off, each batch is freed once the
    next steps run (a closure function that read its own attributes kept every batch until the collector ran)."""
    import gc

    from helpers import BatchesFreed

    freed = BatchesFreed()
    opt = TwoPassSGD if passes == 2 else torch.optim.SGD
    model = ImageClassifier(TinyNet(4), 4, optimizer=lambda p: opt(p, lr=0.1))
    gc.collect()
    gc.disable()
    try:
        trainer(max_epochs=1, callbacks=[freed]).fit(model, DataLoader(FreshBatches(), batch_size=None))
    finally:
        gc.enable()
    assert freed.checked == 4  # batches 0-3, checked at the starts of batches 2-5


def test_optimizer_that_skips_the_closure_is_reported():
    model = ImageClassifier(TinyNet(4), 4, optimizer=lambda p: LazyOptimizer(p, lr=0.1))
    with pytest.raises(RuntimeError, match="did not evaluate the closure"):
        trainer(max_steps=1).fit(model, loader(batches(1)))


def test_16_mixed_is_refused_for_optimizers_without_grad_scaler_support():
    model = ImageClassifier(TinyNet(4), 4)
    opt = TwoPassSGD(model.parameters())
    model.optimizers = lambda: opt
    model.trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(ValueError, match="bf16-mixed"):
        model.on_fit_start()
    model.trainer = SimpleNamespace(precision="bf16-mixed")
    model.on_fit_start()  # accepted


def test_gradient_accumulation_is_refused():
    model = ImageClassifier(TinyNet(4), 4)
    with pytest.raises(Exception, match="accumulat"):
        trainer(max_steps=1, accumulate_grad_batches=2).fit(model, loader(batches(2)))


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_scheduler_steps_per_epoch_or_per_step(interval):
    model = ImageClassifier(TinyNet(4), 4, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                            lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5),
                            scheduler_interval=interval)
    tr = trainer(max_epochs=2)
    tr.fit(model, loader(batches(3)))
    steps = 2 if interval == "epoch" else 6
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**steps)



@pytest.mark.parametrize("interval", ["epochs", "Step", None])
def test_an_unknown_scheduler_interval_is_refused_by_name(interval):
    """From Python nothing checks the Literal: an interval that is neither "epoch" nor "step" would never step the
    scheduler, silently training at the initial learning rate."""
    with pytest.raises(ValueError, match=f"scheduler_interval must be 'epoch' or 'step', got {interval!r}"):
        ImageClassifier(TinyNet(4), 4, scheduler_interval=interval)

def test_grad_clip_norm_limits_the_update():
    net = TinyNet(4)
    before = [p.detach().clone() for p in net.parameters()]
    model = ImageClassifier(net, 4, optimizer=lambda p: torch.optim.SGD(p, lr=1.0), grad_clip_norm=1e-3)
    trainer(max_steps=1).fit(model, loader(batches(1)))
    delta = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(net.parameters(), before)))
    assert delta.item() == pytest.approx(1e-3, rel=1e-3)


def test_tuple_batches_and_predict_outputs():
    data = [(b["image"], b["target"]) for b in batches(2)]
    model = ImageClassifier(TinyNet(4), 4)
    tr = trainer(max_steps=2)
    tr.fit(model, DataLoader(data, batch_size=None))
    out = tr.predict(model, loader(batches(1)))
    assert set(out[0]) == {"pred", "confidence", "probs", "index", "target"}
    assert torch.allclose(out[0]["probs"].sum(1), torch.ones(8))
    assert torch.equal(out[0]["pred"], out[0]["probs"].argmax(1))


def test_soft_targets_and_label_smoothing():
    logits, target = torch.randn(6, 5), torch.randint(0, 5, (6,))
    onehot = F.one_hot(target, 5).float()
    assert torch.allclose(soft_cross_entropy(logits, onehot, 0.1),
                          F.cross_entropy(logits, target, reduction="none", label_smoothing=0.1), atol=1e-6)
    model = ImageClassifier(TinyNet(5), 5, label_smoothing=0.2)
    batch = {"target": target, "soft_target": onehot}
    assert torch.allclose(model.per_sample_loss(logits, batch),
                          F.cross_entropy(logits, target, reduction="none", label_smoothing=0.2), atol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageClassifier(TinyNet(5), 5, label_smoothing=1.0)


def test_channels_last_gives_the_same_logits():
    net = TinyNet(4).eval()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    model = ImageClassifier(copy.deepcopy(net), 4, channels_last=True).eval()
    assert model.backbone.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_metrics_are_per_stage_clones():
    model = ImageClassifier("resnet8", 10)
    assert set(model.val_metrics.keys()) == {"val/acc", "val/acc_top5"}
    assert model.train_metrics["train/acc"] is not model.val_metrics["val/acc"]


def test_evaluation_loss_is_the_plain_cross_entropy_whatever_the_training_label_smoothing():
    """``test/loss`` (and ``val/loss``) measure the model, not the training objective: no label smoothing, the mean
    cross-entropy over all samples (equal batches). Smoothing 0.3 on 4 classes would move it by far more than the
    float32 round-off of 16 log-softmaxes and a mean (< 1e-5 relative)."""
    data = batches(2, 8, 4)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    with torch.no_grad():
        net[1].weight.mul_(20.0)  # confident predictions: smoothing changes the loss a lot
    model = ImageClassifier(net, 4, label_smoothing=0.3)
    t = trainer()
    t.test(model, loader(data), verbose=False)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b["image"]) for b in data])
    target = torch.cat([b["target"] for b in data])
    plain = F.cross_entropy(logits, target)
    assert float(t.callback_metrics["test/loss"]) == pytest.approx(float(plain), rel=1e-5)
    smoothed = F.cross_entropy(logits, target, label_smoothing=0.3)
    assert abs(float(smoothed - plain)) > 1e-2 * float(plain)
