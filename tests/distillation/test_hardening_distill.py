"""Hostile and corrupt teacher files (issue 18, item 6) and DeepKD's batched gradient streams (item 16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_methods.distillation.teacher import load_teacher

from distill_utils import NUM_CLASSES, TEACHER, make_module, write_teacher


def dict_batch(n: int = 8, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "target": torch.randint(0, NUM_CLASSES, (n,), generator=g)}


class RunsCodeWhenUnpickled:
    """Unpickling this object creates ``marker``: stands in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def crafted_teacher(tmp_path: Path) -> tuple[Path, Path]:
    good = write_teacher(tmp_path / "good")
    marker = tmp_path / "code_ran"
    payload = torch.load(good, weights_only=True)
    payload["extra"] = RunsCodeWhenUnpickled(marker)
    path = tmp_path / "crafted.pth"
    torch.save(payload, path)
    return path, marker


def test_a_crafted_teacher_file_never_runs_code(tmp_path):
    path, marker = crafted_teacher(tmp_path)
    with pytest.raises(ValueError, match="teacher_allow_pickle") as info:
        load_teacher(TEACHER, path, NUM_CLASSES)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_unpickling_a_teacher_needs_the_explicit_opt_in_and_warns(tmp_path):
    path, marker = crafted_teacher(tmp_path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        model, file = load_teacher(TEACHER, path, NUM_CLASSES, allow_pickle=True)
    assert marker.exists() and file == path and not model.training


def test_teacher_with_numpy_metadata_loads_without_unpickling(tmp_path):
    import numpy as np

    good = write_teacher(tmp_path / "good")
    payload = torch.load(good, weights_only=True)
    payload["best_acc"] = np.float64(79.42)  # what some training scripts record beside the weights
    torch.save(payload, tmp_path / "numpy.pth")
    model, _ = load_teacher(TEACHER, tmp_path / "numpy.pth", NUM_CLASSES)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), payload["model"].values()))


def test_truncated_or_non_finite_teacher_files_are_refused_by_name(tmp_path):
    good = write_teacher(tmp_path / "good")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated") as info:
        load_teacher(TEACHER, truncated, NUM_CLASSES)
    assert str(truncated) in str(info.value)
    payload = torch.load(good, weights_only=True)
    key = next(k for k, v in payload["model"].items() if v.is_floating_point() and v.numel() > 1)
    payload["model"][key][0] = float("nan")
    torch.save(payload, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=f"non-finite weights.*{key}"):
        load_teacher(TEACHER, tmp_path / "nan.pth", NUM_CLASSES)


# ------------------------------------------------------------------------------------------ DeepKD streams (item 16)
def _streams(module, batch, batched: bool):
    module._batched_streams, module._batched_ok = batched, False
    terms, logits = module.loss_terms(batch)
    losses = (terms["ce"].mean(), terms["tckd"].mean(), terms["nckd"].mean())
    return module.stream_gradients(losses, logits, list(module.backbone.parameters()))


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_batched_streams_equal_the_three_backward_passes(method, tmp_path, one_thread):
    extra = {"beta": 2.0} if method == "dkd" else {}  # KD has no NCKD weight
    module = make_module(write_teacher(tmp_path), deepkd=True, method=method, **extra)
    module.train()
    batch = dict_batch()
    sequential = _streams(module, batch, batched=False)
    batched = _streams(module, batch, batched=True)
    assert module._batched_ok  # the batched path really ran
    for s, b in zip(sequential, batched, strict=True):
        for gs, gb in zip(s, b, strict=True):
            torch.testing.assert_close(gb, gs, atol=1e-6, rtol=1e-5)
    # float64: the same sums in another order, to rounding
    module.double()
    batch64 = {**batch, "image": batch["image"].double()}
    for s, b in zip(_streams(module, batch64, False), _streams(module, batch64, True), strict=True):
        assert max(float((gs - gb).abs().max()) for gs, gb in zip(s, b)) < 1e-12


def test_batched_streams_fall_back_to_sequential_with_a_warning(tmp_path, monkeypatch, one_thread):
    import lightning_methods.distillation.deepkd as mod

    module = make_module(write_teacher(tmp_path), deepkd=True)
    batch = dict_batch()
    expected = _streams(module, batch, batched=False)

    def unsupported(*args, **kwargs):
        raise RuntimeError("Batching rule not implemented for some_op")

    monkeypatch.setattr(mod, "batched_stream_gradients", unsupported)
    module._batched_streams, module._batched_ok = True, False
    terms, logits = module.loss_terms(batch)
    with pytest.warns(UserWarning, match="three backward passes"):
        got = module.stream_gradients((terms["ce"].mean(), terms["tckd"].mean(), terms["nckd"].mean()), logits,
                                      list(module.backbone.parameters()))
    assert not module._batched_streams
    for s, g in zip(expected, got):
        for a, b in zip(s, g):
            torch.testing.assert_close(a, b)


def test_subclasses_with_their_own_loss_terms_use_the_sequential_path(tmp_path):
    from lightning_methods.distillation import DeepKDClassifier

    class Extra(DeepKDClassifier):
        def loss_terms(self, batch):
            return super().loss_terms(batch)

    teacher = str(write_teacher(tmp_path))
    assert make_module(teacher, deepkd=True, deepkd_streams="batched")._batched_streams is True
    assert make_module(teacher, deepkd=True, deepkd_streams="sequential")._batched_streams is False
    auto = make_module(teacher, deepkd=True)
    assert auto._batched_streams is None  # decided at the first step: batched on CUDA, sequential on the CPU
    _ = auto.stream_gradients(*_losses_and_logits(auto), list(auto.backbone.parameters()))
    assert auto._batched_streams is False
    extra = Extra(backbone="resnet8", teacher=TEACHER, teacher_checkpoint=teacher, num_classes=NUM_CLASSES,
                  log_teacher_accuracy=False, deepkd_streams="batched")
    assert not extra._batched_streams


def _losses_and_logits(module):
    terms, logits = module.loss_terms(dict_batch())
    return (terms["ce"].mean(), terms["tckd"].mean(), terms["nckd"].mean()), logits


def test_a_batched_training_step_equals_a_sequential_one(tmp_path, one_thread):
    from distill_utils import loader, trainer

    teacher = write_teacher(tmp_path)
    steps = {}
    for mode in ("batched", "sequential"):
        module = make_module(teacher, deepkd=True, method="dkd", beta=2.0, deepkd_streams=mode)
        trainer(max_steps=2).fit(module, loader(16, 8))
        steps[mode] = module
    assert steps["batched"]._batched_ok
    for (name, a), b in zip(steps["batched"].backbone.named_parameters(), steps["sequential"].backbone.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
