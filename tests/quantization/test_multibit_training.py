"""MultiBitClassifier + BitwiseCoresetCallback in the Trainer: one optimizer step per batch, detached soft targets,
per-bit batches from the subsets, refresh schedule, cost counters, per-bit metrics, resume, bad input."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from multibit_helpers import BITS, TinyImages, tiny_model
from torch.utils.data import DataLoader

from lightning_methods.callbacks import BitwiseCoresetCallback
from lightning_methods.layers import set_bits
from lightning_methods.optim import SAM
from lightning_methods.quantization import MultiBitClassifier

from helpers import quiet_trainer


class Recorder(Callback):
    """Records, per training batch, the dataset indices of every bit-width's chunk and the optimizer step count."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, bool, list[torch.Tensor]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        chunks = pl_module.chunks(batch)
        self.chunks.append((trainer.current_epoch, pl_module.bitwise_batches, [c["index"].clone() for c in chunks]))


class CountingAdam(torch.optim.Adam):
    steps = 0

    def step(self, closure=None):
        CountingAdam.steps += 1
        return super().step(closure)


def fit(model, callbacks=(), epochs=3, **trainer_kw):
    args = dict(max_epochs=epochs, reload_dataloaders_every_n_epochs=1, callbacks=list(callbacks))
    args.update(trainer_kw)
    trainer = quiet_trainer(**args)
    trainer.fit(model, TinyImages())
    return trainer


def test_one_optimizer_step_per_batch_and_subsets_per_bit(one_thread):
    CountingAdam.steps = 0
    model = tiny_model(optimizer=partial(CountingAdam, lr=1e-2))
    coreset, rec = BitwiseCoresetCallback(prune_rate=0.5, refresh_every=1, warmup_full=1), Recorder()
    trainer = fit(model, [coreset, rec], epochs=2)
    assert CountingAdam.steps == trainer.global_step == len(rec.chunks) == 6 + 3  # 48 / 8, then 24 / 8
    warm = [c for c in rec.chunks if c[0] == 0]
    assert all(not bitwise and all(torch.equal(i[0], j) for j in i) for _, bitwise, i in warm)  # one shared batch
    bitwise_steps = [c for c in rec.chunks if c[0] == 1]
    assert all(b for _, b, _ in bitwise_steps)
    positions = trainer.datamodule.train_set.indices  # index == position here
    for k, bits in enumerate(model.train_order):
        seen = torch.cat([chunks[k] for _, _, chunks in bitwise_steps]).sort().values
        assert torch.equal(seen, positions[coreset.subsets[bits]])  # each child visits its subset once
    cost = model.cost.history
    assert cost[0]["samples_by_kind"]["train"] == {str(b): 48 for b in model.train_order}
    assert cost[1]["samples_by_kind"]["train"] == {str(b): 24 for b in model.train_order}
    assert cost[1]["samples_by_kind"]["score"] == {str(b): 48 for b in model.train_order}
    assert cost[1]["samples"] == 5 * 24 + 5 * 48 and model.cost.total_samples[1] == 48 + 24 + 48
    assert trainer.callback_metrics["coreset/subset_fraction"] == 0.5


def test_refresh_only_on_schedule(one_thread, monkeypatch):
    coreset = BitwiseCoresetCallback(prune_rate=0.75, refresh_every=2, warmup_full=1, score="random")
    refreshed = []
    original = coreset.refresh
    monkeypatch.setattr(coreset, "refresh", lambda t, m, e: (refreshed.append(e), original(t, m, e)))
    fit(tiny_model(), [coreset], epochs=5, limit_val_batches=0)
    assert refreshed == [1, 3]


def test_soft_targets_carry_no_gradient(one_thread):
    """The gradient of one step equals the sum of per-bit gradients with the teacher's softmax as a constant."""
    torch.manual_seed(0)
    model = tiny_model(supervision="recursive").double()
    grads = {}

    class Grab(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    reference = tiny_model(supervision="recursive").double()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.arange(8) % 4
    batch = {"image": x, "target": y, "index": torch.arange(8)}
    quiet_trainer(max_steps=1, callbacks=[Grab()], precision="64-true").fit(model, DataLoader([batch], batch_size=None))
    reference.train()
    teacher, total = None, 0
    for bits in reference.train_order:
        set_bits(reference.backbone, bits)
        logits = reference(x)
        if teacher is None:
            loss = F.cross_entropy(logits, y)
        else:
            loss = -(torch.softmax(teacher, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
        teacher = logits.detach()
        total = total + loss
    total.backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)


def test_per_bit_metrics_and_test_eval_bits(one_thread, tmp_path):
    model = tiny_model(eval_bits=[1, 3, 32], bn_recalibration="untrained")
    trainer = fit(model, epochs=1, limit_val_batches=2)
    for bits in (1, 3, 32):
        assert f"val/acc_bit{bits}" in trainer.callback_metrics
    mean = (trainer.callback_metrics["val/acc_bit1"] + trainer.callback_metrics["val/acc_bit32"]) / 2
    assert trainer.callback_metrics["val/acc"] == pytest.approx(float(mean))  # mean over the trained bits
    model.eval_bits = [2, 5]  # untrained ones: recalibrated, training statistics restored afterwards
    before = [b.clone() for b in model.backbone.layers[0].bn0.running_mean]
    metrics = trainer.test(model, TinyImages(), verbose=False)[0]
    assert {"test/acc_bit2", "test/acc_bit5"} <= set(metrics)
    assert torch.equal(torch.stack(before), model.backbone.layers[0].bn0.running_mean)


def test_test_writes_the_per_bit_accuracy_files_of_a_results_run(one_thread, tmp_path):
    """With a ResultsWriter (every CLI run), ``test`` writes bit_accuracy_test.json / .png in the run directory; the
    JSON holds the logged per-bit accuracies."""
    from lightning_methods.callbacks import ResultsWriter

    model = tiny_model(eval_bits=[1, 32])
    trainer = quiet_trainer(default_root_dir=tmp_path, callbacks=[ResultsWriter(dirpath=str(tmp_path))])
    metrics = trainer.test(model, TinyImages(), verbose=False)[0]
    data = json.loads((tmp_path / "bit_accuracy_test.json").read_text())
    assert data["bits"] == [1, 32]
    assert data["accuracy"] == pytest.approx([metrics["test/acc_bit1"], metrics["test/acc_bit32"]], abs=1e-7)
    assert (tmp_path / "bit_accuracy_test.png").stat().st_size > 0
    # a later `test` of one of the run's checkpoints: files tagged as its record is, the first ones untouched
    first = (tmp_path / "bit_accuracy_test.json").read_bytes()
    trainer.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    model.eval_bits = [2, 32]
    trainer = quiet_trainer(default_root_dir=tmp_path, callbacks=[ResultsWriter(dirpath=str(tmp_path))])
    trainer.test(model, TinyImages(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), verbose=False,
                 weights_only=False)
    assert (tmp_path / "results_test-last.json").is_file()
    assert json.loads((tmp_path / "bit_accuracy_test-last.json").read_text())["bits"] == [2, 32]
    assert (tmp_path / "bit_accuracy_test-last.png").stat().st_size > 0
    assert (tmp_path / "bit_accuracy_test.json").read_bytes() == first


def _run(tmp_path, epochs, ckpt=None, augment="none"):
    torch.manual_seed(0)
    model = tiny_model()
    coreset = BitwiseCoresetCallback(prune_rate=0.5, refresh_every=2, warmup_full=1)
    calls = []
    original = coreset.refresh
    coreset.refresh = lambda t, m, e: (calls.append(e), original(t, m, e))
    trainer = quiet_trainer(max_epochs=epochs, reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path,
                            callbacks=[coreset, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                            enable_checkpointing=True, limit_val_batches=1)
    trainer.fit(model, TinyImages(augment=augment), ckpt_path=ckpt)
    return model, coreset, calls


@pytest.mark.parametrize("augment", ["none", "colorjitter"])
def test_resume_gives_the_same_next_steps(one_thread, tmp_path, augment):
    """Also with a worker-side augmentation (colorjitter draws in the dataset): the coreset epochs' loader keys each
    sample by its epoch, so the resumed run draws the same jitter as the uninterrupted one."""
    full, full_cb, full_calls = _run(tmp_path / "a", 4, augment=augment)
    _run(tmp_path / "b", 2, augment=augment)
    resumed, resumed_cb, resumed_calls = _run(tmp_path / "b", 4, ckpt=str(tmp_path / "b" / "last.ckpt"),
                                              augment=augment)
    assert full_calls == [1, 3] and resumed_calls == [3]  # the finished refresh of epoch 1 is not redone
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for bits in full.bits:
        assert torch.equal(full_cb.subsets[bits], resumed_cb.subsets[bits])
        assert torch.equal(full_cb.scores[bits], resumed_cb.scores[bits])
    assert full.cost.total_samples == resumed.cost.total_samples


def test_bad_input_is_refused(one_thread):
    with pytest.raises(ValueError, match="eval_bits is empty"):
        tiny_model(eval_bits=[])
    with pytest.raises(ValueError, match="1..32"):
        tiny_model(bits=[0, 32])
    with pytest.raises(ValueError, match="1..32"):
        tiny_model(eval_bits=[64])
    for bad in (1.0, -0.2):
        with pytest.raises(ValueError, match="prune_rate must be in"):
            BitwiseCoresetCallback(prune_rate=bad)
    with pytest.raises(ValueError, match="score_bn must be 'running' or 'recalibrated', got 'eval'"):
        BitwiseCoresetCallback(score_bn="eval")
    with pytest.raises(ValueError, match="score_recalib_batches must be >= 1, got 0"):
        BitwiseCoresetCallback(score_recalib_batches=0)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs: 1"):
        quiet_trainer(max_epochs=1, callbacks=[BitwiseCoresetCallback()]).fit(tiny_model(), TinyImages())
    with pytest.raises(ValueError, match="no layer left to quantize"):
        MultiBitClassifier(backbone="resnet8", num_classes=4, float_layers=["*conv*", "*downsample*"])
    sam = partial(SAM, base_optimizer=partial(torch.optim.SGD, lr=0.1), rho=0.05)
    trainer = quiet_trainer(max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu")])
    with pytest.raises(ValueError, match="cannot run under precision='16-mixed'"):
        trainer.fit(tiny_model(optimizer=sam), TinyImages())


def test_all_bits_train_through_the_closure_with_sam(one_thread):
    """A two-pass optimizer re-runs every bit-width; BN statistics move once per batch."""
    sam = partial(SAM, base_optimizer=partial(torch.optim.SGD, lr=0.05), rho=0.05)
    model = tiny_model(optimizer=sam, shared_bn=True)
    trainer = fit(model, epochs=1, limit_val_batches=0, limit_train_batches=2)
    assert trainer.global_step == 2
    assert int(model.backbone.layers[0].bn0.num_batches_tracked) == 2 * len(BITS)


def test_gpu_resident_loader_and_grand_scores(one_thread):
    """The device-resident loader is sliced by the same per-bit order; GraNd reads the classifier's input."""
    model, rec = tiny_model(), Recorder()
    coreset = BitwiseCoresetCallback(prune_rate=0.75, refresh_every=1, warmup_full=0, score="grand")
    trainer = quiet_trainer(max_epochs=1, reload_dataloaders_every_n_epochs=1, callbacks=[coreset, rec],
                            limit_val_batches=0)
    trainer.fit(model, TinyImages(gpu_resident=True))
    # 12 samples per bit-width, batch 8: two steps (8 + 4), every coreset sample once despite the loader's drop_last
    assert len(rec.chunks) == 2 and all(bitwise for _, bitwise, _ in rec.chunks)
    positions = trainer.datamodule.train_set.indices  # index == position here
    for k, bits in enumerate(model.train_order):
        seen = torch.cat([chunks[k] for _, _, chunks in rec.chunks])
        assert torch.equal(seen.sort().values, positions[coreset.subsets[bits]])  # each sample exactly once
        assert len(coreset.scores[bits]) == 48 and (coreset.scores[bits] > 0).all()


def test_a_multibit_step_frees_its_batch_by_reference_counting(one_thread):
    """The multi-bit closure (which also keeps the batch's first chunk for logging) is no reference cycle: with the
    cyclic garbage collector off, each batch is freed once the next steps run."""
    import gc

    from helpers import BatchesFreed

    freed, model = BatchesFreed(), tiny_model()
    gc.collect()
    gc.disable()
    try:
        quiet_trainer(max_epochs=1, callbacks=[freed]).fit(model, TinyImages(n_train=40))
    finally:
        gc.enable()
    assert freed.checked == 3  # 5 batches of 8: batches 0-2, checked at the starts of batches 2-4


@pytest.mark.parametrize("supervision", ["hard", "soft", "recursive"])
def test_per_bit_batches_gradient_is_the_sum_of_each_childs_loss(supervision, one_thread):
    """Spec: on per-bit (coreset) batches every child b trains on its own batch; the loss is CE for every bit-width by
    default (``hard``), and the soft-target options take the teacher bit-width's softmax on the *child's* batch from
    one extra forward pass that carries no gradient. One step's gradient equals the gradient of the sum of the
    children's mean losses with the soft targets as constants (float64)."""
    torch.manual_seed(0)
    model = tiny_model(supervision=supervision).double()
    reference = tiny_model(supervision=supervision).double()
    reference.load_state_dict(model.state_dict())
    k, m = len(model.train_order), 4
    x, y = torch.randn(k * m, 3, 8, 8, dtype=torch.float64), torch.arange(k * m) % 4
    batch = {"image": x, "target": y, "index": torch.arange(k * m)}
    grads = {}

    class Grab(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    model.bitwise_batches = True  # what BitwiseCoresetCallback sets on coreset epochs
    quiet_trainer(max_steps=1, callbacks=[Grab()], precision="64-true").fit(model, DataLoader([batch], batch_size=None))
    reference.train()
    total = 0
    for i, bits in enumerate(reference.train_order):
        xi, yi = x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]
        if i == 0 or supervision == "hard":
            set_bits(reference.backbone, bits)
            loss = F.cross_entropy(reference(xi), yi)
        else:
            teacher_bits = reference.train_order[i - 1] if supervision == "recursive" else reference.train_order[0]
            set_bits(reference.backbone, teacher_bits)
            with torch.no_grad():
                target = torch.softmax(reference(xi), -1)
            set_bits(reference.backbone, bits)
            loss = -(target * F.log_softmax(reference(xi), -1)).sum(-1).mean()
        total = total + loss
    total.backward()
    # float64, the same operations summed in another order: a few thousand roundings per gradient entry
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    teacher = model.cost.history[0]["samples_by_kind"]["teacher"]
    expected = {} if supervision == "hard" else {
        str(b): m * (1 if supervision == "recursive" else k - 1)
        for b in (model.train_order[:-1] if supervision == "recursive" else model.train_order[:1])}
    assert {b: n for b, n in teacher.items() if n} == expected  # one extra forward per soft target, on m samples


def test_spec_defaults(one_thread):
    """Spec defaults (multibit_quant.md, Hyperparameters): trained bits 1, 2, 4, 8, 32; calibrated 3, 5, 6, 7; one
    shared BN with WBC (eps 1e-8) and CE for every bit (EMQ); 50 recalibration batches; ResNet-20 x5 (80 / 160 / 320
    channels); coresets with p = 0.8, refresh every 10 epochs, 1 full-data warm-up epoch, EL2N scores."""
    from lightning_methods.layers import QuantConv2d, SwitchableBatchNorm

    cb = BitwiseCoresetCallback()
    assert (cb.prune_rate, cb.refresh_every, cb.warmup_full, cb.score, cb.score_ema) == (0.8, 10, 1, "el2n", None)
    model = MultiBitClassifier(num_classes=100)
    assert model.bits == [1, 2, 4, 8, 32] and model.eval_bits == [1, 2, 3, 4, 5, 6, 7, 8, 32]
    assert (model.supervision, model.recalib_batches, model.bn_recalibration) == ("hard", 50, "all")
    assert not any(isinstance(m, SwitchableBatchNorm) for m in model.backbone.modules())
    quantized = [m for m in model.backbone.modules() if isinstance(m, QuantConv2d)]
    assert quantized and all(m.wbc and m.wbc_eps == 1e-8 and m.wbc_max_ratio is None for m in quantized)
    widths = sorted({m.out_channels for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)})
    assert widths == [80, 160, 320]


@pytest.mark.parametrize("score_bn", ["running", "recalibrated"])
def test_scores_use_the_chosen_batchnorm_statistics_and_training_keeps_its_own(score_bn, one_thread):
    """score_bn="running" scores every child with the shared running statistics training left; "recalibrated"
    re-estimates each child's first (recalibrate_bn on calibration_batches, as evaluation does) and puts the training
    statistics back, bit for bit. Reference: a copy of the module scored child by child, batch by batch as the
    callback does (same shapes, so the same float operations)."""
    import copy

    from lightning_methods.quantization.bn import bn_stats, load_bn_stats, recalibrate_bn
    from lightning_methods.quantization.coreset import el2n_scores
    from lightning_methods.quantization.data import calibration_batches, plain_images, scoring_loader

    coreset = BitwiseCoresetCallback(prune_rate=0.5, refresh_every=1, warmup_full=1, score_bn=score_bn,
                                     score_recalib_batches=3)
    seen = {}
    original = coreset.refresh

    def refresh(trainer, module, epoch):
        ref, bits = copy.deepcopy(module), list(module.train_order)
        base = bn_stats(ref.backbone)
        expected = {}
        for b in bits:
            load_bn_stats(ref.backbone, base)
            if score_bn == "recalibrated":
                recalibrate_bn(ref.backbone, b, calibration_batches(trainer, 3, 8, ref.device), 3)
            set_bits(ref.backbone, b)
            ref.eval()
            with torch.no_grad():
                expected[b] = torch.cat([el2n_scores(ref(plain_images(batch["image"], trainer, ref.device)),
                                                     batch["target"])
                                         for batch in scoring_loader(trainer.datamodule.train_set, 8)])
        seen["before"], seen["expected"] = bn_stats(module.backbone), expected
        original(trainer, module, epoch)
        seen["after"] = bn_stats(module.backbone)

    coreset.refresh = refresh
    model = tiny_model(shared_bn=True, wbc=True)
    fit(model, [coreset], epochs=2, limit_val_batches=0)
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], seen["after"]))  # training's statistics kept
    for b, expected in seen["expected"].items():
        assert torch.equal(coreset.scores[b], expected), b
    extra = 3 * 8 if score_bn == "recalibrated" else 0
    assert model.cost.history[1]["samples_by_kind"]["score"] == {str(b): 48 + extra for b in model.train_order}


def test_recalibrated_scores_differ_from_running_ones_on_a_shared_bn(one_thread):
    """The option changes what is scored: with one shared BN trained by every child, at least one child's scores move
    when its statistics are its own (otherwise the test above could not tell the two apart)."""
    scores = {}
    for score_bn in ("running", "recalibrated"):
        torch.manual_seed(0)
        coreset = BitwiseCoresetCallback(prune_rate=0.5, refresh_every=1, warmup_full=1, score_bn=score_bn)
        fit(tiny_model(shared_bn=True, wbc=True), [coreset], epochs=2, limit_val_batches=0)
        scores[score_bn] = coreset.scores
    # EL2N lies in [0, sqrt 2]; float32 rounding of this tiny net moves a score by ~1e-6, the statistics by ~0.1 here
    moved = [b for b in BITS if (scores["running"][b] - scores["recalibrated"][b]).abs().max() > 1e-3]
    assert moved, {b: (scores["running"][b] - scores["recalibrated"][b]).abs().max() for b in BITS}
