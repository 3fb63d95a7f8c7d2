"""Golden values of the official Any-Precision code (SHI-Labs/Any-Precision-DNNs, run in float64 on CPU): the weight
and activation quantizers, the soft cross-entropy, the converted pre-activation ResNet at every bit-width, and one
recursive training step (switchable BN, Adam) through MultiBitClassifier and the Trainer."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from multibit_helpers import BITS, fill, golden_inputs
from torch.utils.data import DataLoader

from lightning_methods.classifier import soft_cross_entropy
from lightning_methods.layers import quantize_activation, quantize_weight, set_bits
from lightning_methods.models import create_backbone
from lightning_methods.quantization import MultiBitClassifier, quantize_model

GOLDEN = json.loads((Path(__file__).parent / "multibit_golden.json").read_text())
F64 = dict(dtype=torch.float64)
EPS64 = torch.finfo(torch.float64).eps
# Rounding bounds in float64. A forward pass of the converted pre-activation ResNet-8 rounds about 2,000 times along
# the path to one logit (fan-ins 27 + 144 * 3 + 288 * 2 + 576 + 16 + 32 + 64 = 1,723, plus BatchNorm and the
# pooling mean over 64 positions) on BatchNorm-scaled values of order 1: |error| <= 2,000 * eps64 = 4.4e-13.
FORWARD = 2_000 * EPS64


@pytest.mark.parametrize("bits", BITS)
def test_quantizers_match_official(bits):
    w = (torch.sin(0.37 * torch.arange(12, **F64) + 0.1) * 0.8).reshape(3, 4)
    # tanh, max, scale, round, rescale: a handful of roundings on values <= 1 (8 * eps64 = 1.8e-15)
    torch.testing.assert_close(quantize_weight(w, bits).flatten(), torch.tensor(GOLDEN["weights"][str(bits)], **F64),
                               rtol=0, atol=8 * EPS64)
    x = torch.relu(torch.linspace(-0.5, 1.5, 13, **F64))  # the block's ReLU, then the quantized layer's input quantizer
    torch.testing.assert_close(quantize_activation(x, bits), torch.tensor(GOLDEN["activations"][str(bits)], **F64),
                               rtol=0, atol=8 * EPS64)


def test_soft_cross_entropy_matches_official():
    logits = torch.sin(torch.arange(12.0, **F64)).reshape(3, 4)
    target = torch.softmax(torch.cos(torch.arange(12.0, **F64)).reshape(3, 4), 1)
    # log-softmax over 4 classes, a weighted sum and a mean over 3 rows: about 20 roundings on values <= 2
    assert soft_cross_entropy(logits, target).mean().item() == pytest.approx(GOLDEN["soft_ce"], abs=20 * EPS64 * 2)


def official_twin() -> torch.nn.Module:
    model = quantize_model(create_backbone("preact_resnet8", 10), BITS, shared_bn=False).double()
    fill(model)
    return model


@pytest.mark.parametrize("bits", BITS)
def test_converted_resnet_matches_official(bits, one_thread):
    model = official_twin().eval()
    set_bits(model, bits)
    with torch.no_grad():
        logits = model(golden_inputs())[:2].flatten()
    torch.testing.assert_close(logits, torch.tensor(GOLDEN["eval_logits"][str(bits)], **F64), rtol=0, atol=FORWARD)


def test_state_dict_layout_is_official():
    keys = set(official_twin().state_dict())
    assert "layers.1.bn0.bn_dict.32.running_var" in keys and "layers.1.skip_bn.weight" in keys
    assert "layers.1.skip_conv.weight" in keys and "bn.bn_dict.1.weight" in keys and "fc.bias" in keys
    assert not any(k.startswith("layers.1.skip_bn.bn_dict") for k in keys)  # the shortcut BN is never switched
    assert len(keys) == 196  # the official resnet20q layout with [1, 1, 1] blocks and 5 bit-widths


def test_recursive_training_step_matches_official(one_thread):
    """One batch of MultiBitClassifier (switchable BN, recursive soft targets, Adam) equals train.py's step."""
    model = MultiBitClassifier(backbone="preact_resnet8", num_classes=10, bits=BITS, eval_bits=BITS, shared_bn=False,
                               wbc=False, supervision="recursive", bn_recalibration="none",
                               optimizer=partial(torch.optim.Adam, lr=1e-3, weight_decay=0.0)).double()
    fill(model.backbone)
    batch = {"image": golden_inputs(), "target": torch.tensor([1, 7, 3, 0]), "index": torch.arange(4)}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="64-true", limit_val_batches=0)
    trainer.fit(model, DataLoader([batch], batch_size=None))
    for bits, loss in GOLDEN["step_losses"].items():  # one forward pass and a cross-entropy, loss ~2.4
        assert trainer.callback_metrics[f"train/loss_bit{bits}"].item() == pytest.approx(loss, abs=FORWARD * 2.4)
    # Adam's first step moves a weight by lr * g / (|g| + eps_adam). About 100 parameters (BatchNorm shifts ahead of
    # another BatchNorm) have a gradient that is zero in exact arithmetic and rounding noise in practice, of size
    # sqrt(2,000 roundings) * eps64 * 0.32 (the largest gradient of this step) = 3e-15; the step turns a difference
    # in that noise into lr / eps_adam = 1e5 times as much weight change, which reaches the eval-mode logits with a
    # gain of order 1: 3e-10. Any real difference in the step moves weights by about lr = 1e-3.
    after_step = 1e-3 / 1e-8 * 2_000**0.5 * EPS64 * 0.32
    model.eval()
    with torch.no_grad():
        for bits in BITS:
            set_bits(model.backbone, bits)
            torch.testing.assert_close(model(golden_inputs())[:2].flatten(),
                                       torch.tensor(GOLDEN["after_step_logits"][str(bits)], **F64), rtol=0,
                                       atol=after_step)
    state = model.backbone.state_dict()
    for key, first3 in GOLDEN["after_step_running_mean_first3"].items():
        torch.testing.assert_close(state[key][:3], torch.tensor(first3, **F64), rtol=0, atol=FORWARD)  # batch means
