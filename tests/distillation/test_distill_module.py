"""DistillationClassifier: KD / DKD losses under the closure contract, the DeepKD training step, the frozen teacher and
teacher loading (Hinton et al. arXiv 1503.02531; DKD arXiv 2203.08679; DeepKD arXiv 2505.15133)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from lightning_methods import DistillationClassifier, ImageClassifier
from lightning_methods.losses import kd_loss, nckd_loss, tckd_loss, teacher_target_prob
from lightning_methods.models import create_backbone
from lightning_methods.optim import DeepKD

from distill_utils import NUM_CLASSES, STUDENT, TEACHER, loader, make_module, trainer, write_teacher


@pytest.fixture()
def teacher_file(tmp_path):
    return write_teacher(tmp_path)


def _batch(n: int = 8, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "target": torch.randint(0, NUM_CLASSES, (n,), generator=g)}


@pytest.mark.parametrize("epoch,weight", [(1, 0.05), (10, 0.5), (20, 1.0), (30, 1.0)])
def test_dkd_warmup_weight(epoch, weight, teacher_file, monkeypatch):
    module = make_module(teacher_file, method="dkd", beta=8.0)
    monkeypatch.setattr(DistillationClassifier, "current_epoch", property(lambda self: epoch - 1))
    assert module.kd_warmup() == pytest.approx(weight)
    batch = _batch()
    module.train()
    torch.manual_seed(0)
    losses, logits = module.forward_loss(batch)
    t = module.teacher(batch["image"])
    ce = F.cross_entropy(logits, batch["target"], reduction="none")
    expected = ce + weight * (tckd_loss(logits, t, batch["target"], 4.0, "none")
                              + 8.0 * nckd_loss(logits, t, batch["target"], 4.0, None, "none"))
    torch.testing.assert_close(losses, expected)


def test_kd_loss_is_the_mdistiller_mix(teacher_file):
    module = make_module(teacher_file, method="kd")
    assert module.ce_weight == 0.1
    batch = _batch()
    losses, logits = module.forward_loss(batch)
    t = module.teacher(batch["image"])
    expected = 0.1 * F.cross_entropy(logits, batch["target"], reduction="none") + 0.9 * kd_loss(logits, t, 4.0, "none")
    torch.testing.assert_close(losses, expected)
    module.topk = 3  # with a top-k mask the decomposed form with the masked NCKD is used
    losses, logits = module.forward_loss(batch)
    y = batch["target"]
    weight = 1 - teacher_target_prob(t, y)
    masked = tckd_loss(logits, t, y, 4.0, "none") + weight * nckd_loss(logits, t, y, 4.0, 3, "none")
    torch.testing.assert_close(losses, 0.1 * F.cross_entropy(logits, y, reduction="none") + 0.9 * masked)


@pytest.mark.parametrize("exact", [False, True])
def test_kd_deepkd_streams(exact, teacher_file):
    module = make_module(teacher_file, deepkd=True, method="kd", ce_weight=0.5, exact_per_sample_nckd=exact)
    batch = _batch()
    terms, logits = module.loss_terms(batch)
    t, y = module.teacher(batch["image"]), batch["target"]
    one_minus_p = 1 - teacher_target_prob(t, y)
    nc = nckd_loss(logits, t, y, 4.0, None, "none")
    torch.testing.assert_close(terms["ce"].mean(), 0.5 * F.cross_entropy(logits, y))
    torch.testing.assert_close(terms["tckd"].mean(), tckd_loss(logits, t, y, 4.0))  # no weight, no warm-up
    expected_nc = (one_minus_p * nc).mean() if exact else one_minus_p.mean() * nc.mean()
    torch.testing.assert_close(terms["nckd"].mean(), expected_nc)


def test_deepkd_training_step_matches_manual_update(teacher_file):
    module = make_module(teacher_file, deepkd=True, method="dkd", beta=2.0, lr=0.1)
    student0 = copy.deepcopy(module.backbone)
    teacher = copy.deepcopy(module.teacher)
    data = loader(8, 8)
    trainer(max_steps=1).fit(module, data)
    batch = next(iter(data))
    # reference: the same losses, three autograd.grad calls, one DeepKD step
    ref = copy.deepcopy(student0).train()
    z = ref(batch["image"])
    t = teacher(batch["image"])
    y, w = batch["target"], 1 / 20  # first epoch of the 20-epoch warm-up
    losses = (F.cross_entropy(z, y), w * tckd_loss(z, t, y), 2.0 * w * nckd_loss(z, t, y))
    params = list(ref.parameters())
    grads = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    DeepKD(params, lr=0.1, delta_ncg=0.05).step(grads=tuple(grads))
    for (name, p), q in zip(module.backbone.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=name, atol=1e-6, rtol=1e-5)
    assert module.trainer.global_step == 1


class _TeacherWatch(Callback):
    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append(pl_module.teacher.training)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.modes.append(pl_module.teacher.training)
        assert all(p.grad is None for p in pl_module.teacher.parameters())


@pytest.mark.parametrize("deepkd", [False, True])
def test_teacher_is_frozen_and_in_eval(deepkd, teacher_file):
    module = make_module(teacher_file, deepkd=deepkd)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = copy.deepcopy(module.backbone.state_dict())
    watch = _TeacherWatch()
    trainer(max_epochs=2, callbacks=[watch], limit_val_batches=1, num_sanity_val_steps=1).fit(
        module, loader(16, 8), loader(8, 8))
    assert watch.modes and not any(watch.modes)
    after = module.teacher.state_dict()
    for k, v in before.items():  # weights and BN running_mean / running_var / num_batches_tracked
        assert torch.equal(v, after[k]), k
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert any(not torch.equal(v, module.backbone.state_dict()[k]) for k, v in student_before.items())
    module.train()
    assert module.backbone.training and not module.teacher.training
    n_trainable = sum(p.numel() for g in module.parameter_groups() for p in g["params"])
    assert n_trainable == sum(p.numel() for p in module.backbone.parameters())


def test_teacher_accuracy_is_logged_once(teacher_file):
    module = make_module(teacher_file)
    module.hparams.log_teacher_accuracy = True
    module.teacher_metric = type(module.val_metrics["acc"])(NUM_CLASSES, average="micro")
    t = trainer(max_epochs=1, limit_val_batches=2)
    t.fit(module, loader(8, 8), loader(16, 8))
    data = loader(16, 8)
    with torch.no_grad():
        correct = sum((module.teacher(b["image"]).argmax(1) == b["target"]).sum().item() for b in data)
    assert t.callback_metrics["val/teacher_acc"].item() == pytest.approx(correct / 16)


# ------------------------------------------------------------------------------------------ teacher files
def test_teacher_file_and_folder_layouts(tmp_path):
    file = write_teacher(tmp_path / "cifar_teachers", seed=4)
    expected = torch.load(file)["model"]
    for given in (file, file.parent, tmp_path / "cifar_teachers"):
        module = make_module(given)
        assert module.teacher_path == str(file)
        for k, v in expected.items():
            assert torch.equal(module.teacher.state_dict()[k], v)


def test_teacher_from_lightning_checkpoint_and_plain_state_dict(tmp_path):
    torch.manual_seed(5)
    clf = ImageClassifier(TEACHER, NUM_CLASSES)
    t = trainer(max_steps=1, default_root_dir=tmp_path)
    t.fit(clf, loader(8, 8))
    ckpt = tmp_path / "teacher.ckpt"
    t.save_checkpoint(ckpt)
    module = make_module(ckpt)
    for k, v in clf.backbone.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[k], v)
    plain = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in clf.backbone.state_dict().items()}, plain)  # DataParallel prefix
    assert make_module(plain).teacher_sha256 == module.teacher_sha256


def test_wrong_architecture_stops_with_a_clear_message(tmp_path):
    wrong = write_teacher(tmp_path, arch="resnet20")
    with pytest.raises(ValueError) as err:
        make_module(wrong)
    msg = str(err.value)
    assert "resnet14" in msg and "cifar_teachers/resnet14_vanilla/ckpt_epoch_240.pth" in msg
    assert "configs/distillation/teachers/resnet14.yaml" in msg and "unexpected (36)" in msg
    classes = write_teacher(tmp_path / "c5", arch=TEACHER, num_classes=5)
    with pytest.raises(ValueError, match="shape mismatch"):
        make_module(classes)


def test_missing_file_or_teacher_stops_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="resnet14_vanilla/ckpt_epoch_240.pth"):
        make_module(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="teachers/resnet14.yaml"):
        make_module(tmp_path)  # a folder without the layout
    module = make_module(None)
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        trainer(max_steps=1).fit(module, loader(8, 8))
    assert module.global_step == 0


def test_optimizer_must_match_the_trainer_mode(teacher_file):
    from lightning_methods.distillation import DeepKDClassifier, DKDClassifier

    sgd = partial(torch.optim.SGD, lr=0.05)
    with pytest.raises(TypeError, match="DeepKDClassifier needs lightning_methods.optim.DeepKD"):
        DeepKDClassifier(backbone=STUDENT, teacher=TEACHER, teacher_checkpoint=str(teacher_file),
                         num_classes=NUM_CLASSES, optimizer=sgd).configure_optimizers()
    with pytest.raises(TypeError, match="an optimizer other than DeepKD"):
        DKDClassifier(backbone=STUDENT, teacher=TEACHER, teacher_checkpoint=str(teacher_file),
                      num_classes=NUM_CLASSES, optimizer=partial(DeepKD, lr=0.05)).configure_optimizers()
    with pytest.raises(ValueError, match="grad_clip_norm"):
        DeepKDClassifier(backbone=STUDENT, teacher=TEACHER, teacher_checkpoint=str(teacher_file), grad_clip_norm=1.0,
                         num_classes=NUM_CLASSES)
    default = DeepKDClassifier(backbone=STUDENT, teacher=create_backbone(TEACHER, NUM_CLASSES),
                               num_classes=NUM_CLASSES)
    assert isinstance(default.configure_optimizers(), DeepKD)
    plain = DKDClassifier(backbone=STUDENT, teacher=create_backbone(TEACHER, NUM_CLASSES), num_classes=NUM_CLASSES)
    opt = plain.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.9
    with pytest.raises(TypeError, match="base of the distillation methods"):
        DistillationClassifier(backbone=STUDENT, teacher=create_backbone(TEACHER, NUM_CLASSES), num_classes=10)


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_deepkd_student_learns_the_teacher(method, teacher_file):
    """A few DeepKD steps on one batch pull the student's distribution toward the teacher's (all three streams)."""
    warmup = {"warmup_epochs": 0} if method == "dkd" else {}  # KD has no warm-up
    module = make_module(teacher_file, deepkd=True, method=method, lr=0.05, **warmup)
    module.train()
    batch = _batch(16, seed=9)
    params = list(module.backbone.parameters())
    opt = DeepKD(params, lr=0.05, delta_ncg=0.05)
    t = module.teacher(batch["image"])

    def kd_now() -> float:
        module.backbone.eval()
        with torch.no_grad():
            value = kd_loss(module.backbone(batch["image"]), t).item()
        module.backbone.train()
        return value

    start = kd_now()
    for _ in range(12):
        terms, _ = module.loss_terms(batch)
        losses = [terms[k].mean() for k in ("ce", "tckd", "nckd")]
        grads = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
        opt.step(grads=(grads[0], grads[1], grads[2]))
    end = kd_now()
    assert end < 0.5 * start


def test_method_defaults_are_the_spec_values():
    """Spec (distillation.md): DKD alpha 1, beta 8 (resnet32x4 -> resnet8x4), warm-up 20 epochs, T 4, CE weight 1.0;
    plain KD 0.1 CE + 0.9 KD at T 4; KD + DeepKD CE weight 0.1, the official batch-mean NCKD product by default, DTM
    off (topk 0); logit standardization off; the KD / DKD optimizer SGD lr 0.05, momentum 0.9, wd 5e-4."""
    from lightning_methods.distillation import DeepKDClassifier, DKDClassifier, KDClassifier, KDDeepKDClassifier

    def build(cls):
        return cls(backbone=STUDENT, teacher=create_backbone(TEACHER, NUM_CLASSES), num_classes=NUM_CLASSES,
                   log_teacher_accuracy=False)

    for cls in (DKDClassifier, DeepKDClassifier):
        m = build(cls)
        assert (m.alpha, m.beta, m.warmup_epochs, m.temperature, m.ce_weight) == (1.0, 8.0, 20, 4.0, 1.0)
        assert m.logit_standardization is False
    kd = build(KDClassifier)
    assert (kd.ce_weight, kd.kd_weight, kd.temperature, kd.logit_standardization) == (0.1, 0.9, 4.0, False)
    kd_deep = build(KDDeepKDClassifier)
    assert (kd_deep.ce_weight, kd_deep.exact_per_sample_nckd, kd_deep.topk) == (0.1, False, 0)
    assert build(DeepKDClassifier).topk == 0
    opt = build(DKDClassifier).configure_optimizers()
    assert opt.defaults["weight_decay"] == 5e-4 and opt.defaults["nesterov"] is False


@pytest.mark.parametrize("method", ["dkd", "kd"])
def test_logit_standardization_applies_to_the_distillation_terms_only(method, teacher_file):
    """Spec: optional LOGIT_STAND, z <- (z - mean) / (std + 1e-7) before the distillation losses (CE keeps the raw
    logits, as in the official code)."""
    extra = {"beta": 8.0} if method == "dkd" else {}
    module = make_module(teacher_file, method=method, logit_standardization=True, **extra)
    batch = _batch()
    losses, logits = module.forward_loss(batch)
    t, y = module.teacher(batch["image"]), batch["target"]

    def stand(z):  # the spec's formula, per sample, torch's default (unbiased) std as the official code
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)

    s_std, t_std = stand(logits), stand(t)
    if method == "dkd":  # epoch 1 of the 20-epoch warm-up
        expected = F.cross_entropy(logits, y, reduction="none") + (1 / 20) * (
            tckd_loss(s_std, t_std, y, 4.0, "none") + 8.0 * nckd_loss(s_std, t_std, y, 4.0, None, "none"))
    else:
        expected = (0.1 * F.cross_entropy(logits, y, reduction="none")
                    + 0.9 * kd_loss(s_std, t_std, 4.0, "none"))
    torch.testing.assert_close(losses, expected)
    plain, _ = make_module(teacher_file, method=method, **extra).forward_loss(batch)
    assert not torch.allclose(plain, losses)  # the option changes the loss
