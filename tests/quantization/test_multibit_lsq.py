"""LSQ, the learned-step-size quantizer (Esser et al., ICLR 2020, arXiv 1902.08153) with one step per trained
bit-width (MultiQuant): the forward pass and the gradients of eq. 1-3 against an independent numpy computation, the
initial step ``2 mean|v| / sqrt(Q_P)``, the gradient scale ``1 / sqrt(N Q_P)``, untrained bit-widths, state
round-trips, training and resume through MultiBitClassifier, and two DDP ranks (gloo) that start from the same steps.

No official LSQ code exists (the paper's authors did not publish theirs): the references here are the paper's
equations, evaluated elementwise in float64 numpy."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from multibit_helpers import TinyImages, tiny_model

from lightning_methods.layers import QuantConv2d, QuantLinear, lsq_init, lsq_levels, lsq_quantize, set_bits
from lightning_methods.models import create_backbone
from lightning_methods.quantization import quantize_model
from lightning_methods.utils import leave_process_group

from helpers import next_group_port, quiet_trainer, run_ddp

EPS = np.finfo(np.float64).eps


def reference(v: np.ndarray, s: float, bits: int, signed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's eq. 1-3 elementwise: v_hat, d v_hat / d v and d v_hat / d s (before the gradient scale)."""
    q_n, q_p = lsq_levels(bits, signed)
    r = v / s
    if signed and bits == 1:  # the two levels -s, +s
        inside = np.abs(r) < 1
        level = np.where(r > 0, 1.0, -1.0)
        return level * s, inside.astype(float), np.where(inside, level - r, level)
    inside = (r > -q_n) & (r < q_p)
    levels = np.round(np.clip(r, -q_n, q_p))
    return levels * s, inside.astype(float), np.where(r <= -q_n, -q_n, np.where(r >= q_p, q_p, levels - r))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_forward_and_gradients_are_the_papers_equations(bits, signed):
    g = torch.Generator().manual_seed(bits)
    v = torch.randn(400, generator=g, dtype=torch.float64) * (1.0 if signed else 0.0) + torch.rand(
        400, generator=g, dtype=torch.float64) * (0.5 if signed else 3.0)
    v.requires_grad_(True)
    step = torch.tensor(0.3 if bits < 8 else 0.02, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(400, generator=g, dtype=torch.float64)
    scale = 1 / (400 * lsq_levels(bits, signed)[1]) ** 0.5
    out = lsq_quantize(v, step, bits, signed, grad_scale=scale)
    (out * upstream).sum().backward()
    v_hat, dv, ds = reference(v.detach().numpy(), 0.3 if bits < 8 else 0.02, bits, signed)
    q_n, q_p = lsq_levels(bits, signed)
    assert len(np.unique(v_hat)) <= 2**bits and (v_hat / step.item()).min() >= -q_n
    np.testing.assert_array_equal(out.detach().numpy(), v_hat)  # the same IEEE operations: bit for bit
    # straight through inside the clip range: the upstream gradient, through / s and * s (and / 2, * 2 at 1 bit)
    np.testing.assert_allclose(v.grad.numpy(), upstream.numpy() * dv, rtol=4 * EPS, atol=0)
    # d/ds: autograd forms v / s^2 * s where the reference forms v / s: a few ulps of |v / s| <= Q_P + 1 per element
    terms = upstream.numpy() * ds
    bound = scale * 8 * EPS * np.sum(np.abs(upstream.numpy()) * (np.abs(v.detach().numpy()) / step.item() + 1))
    assert abs(step.grad.item() - scale * terms.sum()) <= bound + scale * len(terms) * EPS * np.abs(terms).max()


def test_the_steps_start_from_the_data_and_scale_their_gradients():
    torch.manual_seed(0)
    layer = QuantLinear(6, 3, quantizer="lsq", lsq_bits=[2, 4, 32]).double()
    assert sorted(layer.weight_step) == sorted(layer.act_step) == ["2", "4"]  # none at 32 bits
    x = torch.rand(5, 6, dtype=torch.float64)
    layer.bits = 4
    layer(x).sum().backward()
    w = layer.weight.detach()
    assert layer.weight_step["4"].item() == pytest.approx(2 * w.abs().mean().item() / 7**0.5, rel=4 * EPS)
    assert layer.act_step["4"].item() == pytest.approx(2 * x.abs().mean().item() / 15**0.5, rel=4 * EPS)
    assert layer.weight_step["2"].item() == 0 and layer.weight_step["2"].grad is None  # not used yet
    # the gradient of the weight step: eq. 3 summed over the weights' gradients, times 1 / sqrt(N_W Q_P)
    xq = lsq_quantize(x, layer.act_step["4"].detach(), 4, False)
    upstream = torch.ones(3, 5, dtype=torch.float64) @ xq  # d sum(y) / d w_hat: every row is the batch sum of x_q
    _, _, ds = reference(w.numpy(), layer.weight_step["4"].item(), 4, True)
    expected = (upstream.numpy() * ds).sum() / (w.numel() * 7) ** 0.5
    assert layer.weight_step["4"].grad.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    again = layer.act_step["4"].item()
    layer(x * 5)
    assert layer.act_step["4"].item() == again  # set once, then learned
    layer.bits = 32
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # full precision: the float layer


def test_untrained_bit_widths_use_the_nearest_learned_step_with_its_clip_range():
    torch.manual_seed(0)
    layer = QuantConv2d(2, 3, 3, quantizer="lsq", lsq_bits=[2, 8]).double()
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    for bits in (2, 8):
        layer.bits = bits
        layer(x)
    s8, a8 = layer.weight_step["8"].item(), layer.act_step["8"].item()
    for bits, owner_w, owner_a in ((4, s8 * 127 / 7, a8 * 255 / 15), (16, s8 * 127 / 32767, a8 * 255 / 65535)):
        layer.bits = bits
        w_hat = lsq_quantize(layer.weight, torch.tensor(owner_w, dtype=torch.float64), bits, True)
        x_hat = lsq_quantize(x, torch.tensor(owner_a, dtype=torch.float64), bits, False)
        torch.testing.assert_close(layer(x), F.conv2d(x_hat, w_hat, layer.bias), rtol=64 * EPS, atol=64 * EPS)


def test_one_bit_weights_take_two_values_and_an_all_zero_input_waits():
    layer = QuantLinear(4, 2, quantizer="lsq", lsq_bits=[1]).double()
    layer.bits = 1
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    layer(zeros)
    assert layer.act_step["1"].item() == 0  # zeros quantize to themselves: the step waits for a real batch
    x = torch.rand(3, 4, dtype=torch.float64)
    layer(x)
    s = layer.weight_step["1"].item()
    assert s > 0 and layer.act_step["1"].item() == pytest.approx(2 * x.mean().item(), rel=4 * EPS)
    assert set(layer.quantized_weight().detach().flatten().tolist()) <= {-s, s}


def test_state_round_trip_and_a_loaded_uninitialized_step_is_set_again():
    torch.manual_seed(0)
    a = QuantLinear(5, 3, quantizer="lsq", lsq_bits=[2, 4]).double()
    fresh = QuantLinear(5, 3, quantizer="lsq", lsq_bits=[2, 4]).double()
    blank = {k: v.clone() for k, v in a.state_dict().items()}
    x = torch.rand(4, 5, dtype=torch.float64)
    set_bits(torch.nn.Sequential(a), 2)
    a(x)
    with torch.no_grad():
        a.act_step["2"].mul_(1.5)  # a learned value, not the initial one
    fresh.load_state_dict(a.state_dict())
    fresh.bits = 2
    assert torch.equal(fresh(x), a(x))
    a.load_state_dict(blank)  # a checkpoint saved before the first step: its steps are set again from the data
    a(x * 2)
    assert a.act_step["2"].item() == pytest.approx(2 * (2 * x).mean().item() / 3**0.5, rel=4 * EPS)


def test_a_step_pushed_below_zero_quantizes_with_epsilon_and_keeps_its_gradient():
    v = torch.tensor([0.5, -2.0, 3.0, 1.0], dtype=torch.float64)
    step = torch.tensor(-0.1, dtype=torch.float64, requires_grad=True)  # where Adam can push a small step
    out = lsq_quantize(v, step, 2, True)
    assert torch.equal(out, torch.tensor([EPS, -2 * EPS, EPS, EPS], dtype=torch.float64))  # clipped: -Q_N, Q_P
    out.sum().backward()
    assert step.grad.item() == 1 - 2 + 1 + 1  # eq. 3 outside the range (Q_P, -Q_N, ...); a plain clamp gives 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="quantizer must be 'dorefa' or 'lsq', got 'lsqq'"):
        QuantLinear(3, 2, quantizer="lsqq")
    with pytest.raises(ValueError, match="needs the trained bit-widths below 32"):
        QuantLinear(3, 2, quantizer="lsq", lsq_bits=[32])
    with pytest.raises(ValueError, match="clamp_full_precision"):
        quantize_model(create_backbone("preact_resnet8", 4, width=0.25), [2, 32], quantizer="lsq",
                       clamp_full_precision=True)


def test_conversion_adds_one_step_per_trained_bit_per_quantized_input_and_weight():
    model = create_backbone("preact_resnet8", 4, width=0.25)
    float_params = sum(p.numel() for p in model.parameters())
    quantize_model(model, [1, 2, 4, 8, 32], quantizer="lsq")
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    expected = sum(4 * (m.quantize_weights + (m.act_quant != "none")) for m in layers)
    assert sum(p.numel() for p in model.parameters()) == float_params + expected
    assert all(m.quantizer == "lsq" and m.lsq_bits == [1, 2, 4, 8] for m in layers)


def test_a_timm_vit_with_signed_inputs_learns_its_steps_also_under_bf16_autocast(one_thread):
    """Token inputs (batch, tokens, features): the input steps start from the first batch with N = tokens x
    features; every learned step of the 4-bit pass gets a finite, non-zero gradient, in float32 and under bf16."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    model = quantize_model(vit, [4, 32], act_quant="signed", quantizer="lsq")
    set_bits(model, 4)
    x = torch.randn(2, 3, 16, 16)
    fc2 = model.blocks[0].mlp.fc2
    seen = []
    fc2.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))  # returns None: no change
    model(x).sum().backward()
    tokens = seen[0]
    assert fc2.act_step["4"].item() == pytest.approx(2 * tokens.abs().mean().item() / 7**0.5, rel=1e-6)
    steps = [p for n, p in model.named_parameters() if "_step." in n]
    assert len(steps) == 2 * 8 and all(p.grad is not None and torch.isfinite(p.grad) and p.grad != 0 for p in steps)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad) for p in steps)


def _fit(folder, epochs: int, ckpt: str | None = None):
    torch.manual_seed(0)
    model = tiny_model(quantizer="lsq", bits=[2, 4, 32], eval_bits=[2, 3, 32])
    trainer = quiet_trainer(max_epochs=epochs, default_root_dir=folder, limit_val_batches=1,
                            callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)], enable_checkpointing=True)
    trainer.fit(model, TinyImages(), ckpt_path=ckpt)
    return model, trainer


def test_training_learns_the_steps_and_resume_gives_the_same_next_steps(one_thread, tmp_path):
    full, trainer = _fit(tmp_path / "a", 4)
    steps = {n: p.detach().clone() for n, p in full.named_parameters() if "_step." in n}
    assert len(steps) == 28 and all(torch.isfinite(v) for v in steps.values())
    torch.manual_seed(0)
    initial = tiny_model(quantizer="lsq", bits=[2, 4, 32])  # the weights the fit started from
    for name, m in initial.backbone.named_modules():
        if getattr(m, "quantizer", None) == "lsq" and m.quantize_weights:
            for bits in (2, 4):  # every weight step was set from those weights, then learned
                assert steps[f"backbone.{name}.weight_step.{bits}"] != lsq_init(m.weight, bits, True)
    assert trainer.callback_metrics["val/acc"] > 0.5  # 4 classes: chance is 0.25
    _fit(tmp_path / "b", 2)
    resumed, _ = _fit(tmp_path / "b", 4, ckpt=str(tmp_path / "b" / "last.ckpt"))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def _ddp_worker(rank: int, world_size: int) -> dict:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    layer = QuantLinear(6, 3, quantizer="lsq", lsq_bits=[2]).double()
    layer.bits = 2
    x = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)) * (rank + 1)
    layer(x)
    out = {"act_step": layer.act_step["2"].item(), "local": 2 * x.mean().item() / 3**0.5}
    leave_process_group()
    next_group_port()
    torch.manual_seed(0)
    model = tiny_model(quantizer="lsq", bits=[2, 32], eval_bits=[2, 32])
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp_find_unused_parameters_true",
                        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, TinyImages(batch_size=4))
    out["params"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    bad = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        bad.fit(tiny_model(quantizer="lsq", bits=[2, 32]), TinyImages(batch_size=4))
    except ValueError as err:
        out["error"] = str(err)
    return out


def test_two_ranks_start_from_one_step_and_stay_identical(one_thread):
    r0, r1 = run_ddp(_ddp_worker, 2, groups=2)
    assert r0["act_step"] == r1["act_step"] == pytest.approx((r0["local"] + r1["local"]) / 2, rel=4 * EPS)
    assert r0["local"] != r1["local"]
    for k in r0["params"]:
        torch.testing.assert_close(r0["params"][k], r1["params"][k], rtol=0, atol=0, msg=k)
    assert any("_step." in k and r0["params"][k] != 0 for k in r0["params"])
    assert "LSQ (quantizer: lsq)" in r0["error"] and "ddp_find_unused_parameters_true" in r1["error"]
