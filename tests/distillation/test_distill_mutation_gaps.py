"""Distillation checks added after a mutation audit: each pins a line whose change the other tests did not notice.
DeepKD (Huang et al., arXiv 2505.15133): the three gradient streams reach their own momentum buffers, the DTM
schedule's k0 = ceil(0.05 C), and the NCKD top-k recorded in (and restored from) a checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_methods.callbacks import TopKScheduleCallback
from lightning_methods.distillation import DKDClassifier
from lightning_methods.losses import nckd_loss, tckd_loss
from lightning_methods.models import create_backbone

from distill_utils import NUM_CLASSES, STUDENT, TEACHER, loader, make_module, trainer, write_teacher


def test_each_deepkd_stream_lands_in_its_own_momentum_buffer(tmp_path):
    """After one DeepKD training step every buffer starts at its first gradient (spec: PyTorch SGD convention), so
    ``momentum_buffer`` = dCE/dθ, ``momentum_tcg_buffer`` = d(w·TCKD)/dθ + λθ₀ (the weight decay goes to TCG only)
    and ``momentum_ncg_buffer`` = d(β·w·NCKD)/dθ. The parameter update alone cannot tell the streams apart after one
    step (it is lr times their sum), so a training step that passed them to the optimizer in another order would
    only show up later, through the different momenta (0.975 / 0.825 / 0.95 here)."""
    module = make_module(write_teacher(tmp_path), deepkd=True, method="dkd", beta=2.0, lr=0.1)
    student0, teacher = copy.deepcopy(module.backbone), copy.deepcopy(module.teacher)
    data = loader(8, 8)
    trainer(max_steps=1).fit(module, data)
    batch = next(iter(data))
    ref = student0.train()
    z, t, y = ref(batch["image"]), teacher(batch["image"]), batch["target"]
    w = 1 / 20  # epoch 1 of the 20-epoch DKD warm-up
    losses = (F.cross_entropy(z, y), w * tckd_loss(z, t, y), 2.0 * w * nckd_loss(z, t, y))
    names, params0 = zip(*ref.named_parameters())
    grads = {name: g for name, g in zip(("tog", "tcg", "ncg"),
                                         (torch.autograd.grad(loss, params0, retain_graph=True) for loss in losses))}
    opt = module.trainer.optimizers[0]
    name_of = {id(p): n for n, p in module.backbone.named_parameters()}
    assert sorted(name_of[id(p)] for p in opt.ordered_params()) == sorted(names)  # the role groups hold the student
    for i, (name, p0) in enumerate(zip(names, params0)):
        state = opt.state[dict(module.backbone.named_parameters())[name]]
        expected = {"tog": grads["tog"][i], "tcg": grads["tcg"][i] + 5e-4 * p0.detach(), "ncg": grads["ncg"][i]}
        # float32 gradients of the same ops in the same order; atol / rtol as in the one-step check of
        # test_distill_module (a few hundred float32 accumulations, eps 1.2e-7 each, stay below 1e-5 relative)
        for stream, key in (("tog", "momentum_buffer"), ("tcg", "momentum_tcg_buffer"),
                            ("ncg", "momentum_ncg_buffer")):
            torch.testing.assert_close(state[key], expected[stream], atol=1e-6, rtol=1e-5, msg=f"{stream} {name}")


@pytest.mark.parametrize("num_classes,k0", [(30, 2), (50, 3), (100, 5), (10, 1)])
def test_topk_schedule_starts_at_the_ceiling_of_five_percent(num_classes, k0):
    """Spec (DTM): k0 = ceil(0.05·C): 0.05·30 = 1.5 -> 2 and 0.05·50 = 2.5 -> 3, where truncation (1, 2) and Python's
    round-half-to-even (2, 2) both differ; 0.05·100 = 5 and 0.05·10 = 0.5 -> 1 cannot tell them apart."""
    cb = TopKScheduleCallback()
    assert cb.initial_k(num_classes) == k0
    assert cb.k_at(0, num_classes) == cb.k_at(19, num_classes) == k0


def test_topk_schedule_without_a_transition_phase_jumps_to_all_classes():
    """``start_epoch == end_epoch`` is allowed (no linear phase): k = k0 before it and C from it on, without dividing
    by the zero-length phase."""
    cb = TopKScheduleCallback(start_k=4, start_epoch=5, end_epoch=5)
    assert [cb.k_at(e, 100) for e in (0, 4, 5, 6)] == [4, 4, 100, 100]


def test_checkpoint_records_and_restores_the_nckd_topk(tmp_path):
    """The DTM top-k in effect is part of the module's checkpoint (``distillation_teacher["topk"]``) and comes back
    on load, also into a module built with another top-k, so a resumed or reloaded student applies the same mask;
    the teacher weights are left out of the saved state_dict and put back from the loaded teacher."""
    teacher = write_teacher(tmp_path)
    module = make_module(teacher, deepkd=True, method="dkd")
    module.topk = 7
    checkpoint = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["distillation_teacher"]["topk"] == 7
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    fresh = make_module(teacher, deepkd=True, method="dkd", topk=0)
    assert fresh.topk == 0
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.topk == 7 and fresh.nckd_topk(10) == 7
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: the teacher keys were restored


def test_a_teacher_given_as_a_module_is_frozen_too():
    """Spec (Lightning notes): the teacher is ``requires_grad_(False)`` and in eval, also when it is handed over as a
    ready ``nn.Module`` (``load_teacher`` freezes only the teachers it loads from files). A teacher parameter that
    requires grad but never gets one is what DDP stops on ("unused parameters")."""
    teacher = create_backbone(TEACHER, NUM_CLASSES).train()
    assert all(p.requires_grad for p in teacher.parameters())
    module = DKDClassifier(backbone=STUDENT, teacher=teacher, num_classes=NUM_CLASSES, log_teacher_accuracy=False)
    assert module.teacher is teacher
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training
    assert any(p.requires_grad for p in module.backbone.parameters())
