"""Distillation training mechanics: checkpoint resume (three DeepKD buffers, top-k schedule, teacher hash), the
dynamic top-k schedule (DeepKD, arXiv 2505.15133), DDP synchronization of the three gradient streams, the CLI."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_methods import DistillationClassifier
from lightning_methods.callbacks import TopKScheduleCallback
from lightning_methods.cli import main
from lightning_methods.distillation import KDClassifier

from distill_utils import NUM_CLASSES, loader, make_module, trainer, write_teacher
from helpers import run_ddp

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ top-k schedule
def test_topk_schedule_values():
    cb = TopKScheduleCallback()  # defaults: k0 = ceil(0.05 C), e1 = 20, e2 = 150
    ks = [cb.k_at(e, 100) for e in range(241)]
    assert ks[0] == 5 and ks[19] == 5 and ks[20] == 5
    assert ks[85] == round(5 + 95 * 65 / 130)
    assert ks[149] < 100 and ks[150] == 100 and ks[240] == 100
    assert all(a <= b for a, b in zip(ks, ks[1:]))
    assert TopKScheduleCallback().k_at(0, 10) == 1  # ceil(0.5)
    assert TopKScheduleCallback(start_k=3, start_epoch=0, end_epoch=4).k_at(2, 11) == round(3 + 8 * 2 / 4)
    with pytest.raises(ValueError, match="start_epoch"):
        TopKScheduleCallback(start_epoch=10, end_epoch=5)


class _RecordTopK(Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(pl_module.topk)


def _deepkd_module(teacher_file: Path, seed: int = 0) -> DistillationClassifier:
    sched = partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1], gamma=0.1)
    return make_module(teacher_file, deepkd=True, method="dkd", seed=seed, lr_scheduler=sched)


def _callbacks() -> list[Callback]:
    return [TopKScheduleCallback(start_k=2, start_epoch=0, end_epoch=2), _RecordTopK()]


def _state(module: DistillationClassifier) -> dict[str, torch.Tensor]:
    out = {f"p.{k}": v.detach().clone() for k, v in module.backbone.state_dict().items()}
    opt = module.trainer.optimizers[0]
    for i, p in enumerate(opt.ordered_params()):
        for key, buf in opt.state[p].items():
            out[f"opt.{i}.{key}"] = buf.clone()
    out["lr"] = torch.tensor(opt.param_groups[0]["lr"])
    return out


def test_resume_gives_the_same_next_steps(tmp_path):
    teacher = write_teacher(tmp_path / "t")
    data = loader(16, 8)  # two steps per epoch
    full = _deepkd_module(teacher)
    cbs = _callbacks()
    trainer(max_epochs=2, callbacks=cbs).fit(full, data)
    assert cbs[1].seen == [2, 2, 6, 6]  # k0 = 2 in epoch 0, round(2 + 8 / 2) in epoch 1

    first = _deepkd_module(teacher)
    t1 = trainer(max_epochs=1, callbacks=_callbacks())
    t1.fit(first, data)
    ckpt = tmp_path / "epoch0.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])  # the teacher is not duplicated
    assert saved["distillation_teacher"]["path"] == str(teacher)
    assert saved["distillation_teacher"]["sha256"] == first.teacher_sha256
    assert len(saved["optimizer_states"][0]["state"][0]) == 3  # TOG, TCG and NCG buffers

    resumed = _deepkd_module(teacher, seed=123)  # different init: everything must come from the checkpoint
    cbs2 = _callbacks()
    trainer(max_epochs=2, callbacks=cbs2).fit(resumed, data, ckpt_path=ckpt)
    assert cbs2[1].seen == [6, 6]
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.trainer.global_step == 4

    other = write_teacher(tmp_path / "other", seed=1)
    wrong = _deepkd_module(other)
    with pytest.raises(ValueError, match="teacher differs"):
        trainer(max_epochs=2).fit(wrong, data, ckpt_path=ckpt)


def test_load_from_checkpoint_with_and_without_the_teacher(tmp_path):
    teacher = write_teacher(tmp_path)
    module = make_module(teacher, method="kd")
    t = trainer(max_steps=1)
    t.fit(module, loader(8, 8))
    ckpt = tmp_path / "kd.ckpt"
    t.save_checkpoint(ckpt)
    loaded = KDClassifier.load_from_checkpoint(ckpt)
    assert loaded.teacher_sha256 == module.teacher_sha256 and type(loaded) is KDClassifier
    for k, v in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.warns(UserWarning, match="without its teacher"):
        student_only = KDClassifier.load_from_checkpoint(ckpt, teacher_checkpoint=None)
    for k, v in module.backbone.state_dict().items():
        assert torch.equal(student_only.backbone.state_dict()[k], v)


# ------------------------------------------------------------------------------------------ DDP
def _ddp_deepkd(rank: int, world_size: int, teacher_file: str) -> dict[str, torch.Tensor]:
    module = make_module(Path(teacher_file), deepkd=True, lr=0.5)
    start = {k: v.detach().clone() for k, v in module.backbone.named_parameters()}
    t = Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=3, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(module, loader(48, 8))  # the distributed sampler gives every rank different batches
    out = {f"p.{k}": v.detach().clone() for k, v in module.backbone.named_parameters()}
    opt = t.optimizers[0]
    for i, p in enumerate(opt.ordered_params()):
        for key, buf in opt.state[p].items():
            out[f"opt.{i}.{key}"] = buf.clone()
    out["moved"] = torch.tensor(max((out[f"p.{k}"] - v).abs().max().item() for k, v in start.items()))
    out["step"] = torch.tensor(t.global_step)
    return out


def test_ddp_ranks_stay_identical_after_deepkd_steps(tmp_path):
    teacher = write_teacher(tmp_path)
    r0, r1 = run_ddp(_ddp_deepkd, 2, (str(teacher),))
    assert r0["step"].item() == r1["step"].item() == 3
    assert r0["moved"].item() > 1e-3
    for k in r0:
        if k != "moved":
            torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=1e-7, msg=k)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_accepts_teacher_checkpoint_as_a_plain_init_argument(tmp_path, capsys):
    teacher = write_teacher(tmp_path, arch="resnet32x4", num_classes=100)
    cfg = REPO / "configs/distillation/cifar100_res32x4_res8x4_deepkd.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(cfg), "--model.teacher_checkpoint", str(teacher), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"teacher_checkpoint: {teacher}" in out and "class_path: lightning_methods.optim.DeepKD" in out
    assert NUM_CLASSES == 10  # the test module's own default stays untouched by the CLI run
