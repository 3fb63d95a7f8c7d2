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


@pytest.mark.parametrize("bits", BITS)
def test_quantizers_match_official(bits):
    w = (torch.sin(0.37 * torch.arange(12, **F64) + 0.1) * 0.8).reshape(3, 4)
    torch.testing.assert_close(quantize_weight(w, bits).flatten(), torch.tensor(GOLDEN["weights"][str(bits)], **F64),
                               rtol=0, atol=1e-15)
    x = torch.relu(torch.linspace(-0.5, 1.5, 13, **F64))  # the block's ReLU, then the quantized layer's input quantizer
    torch.testing.assert_close(quantize_activation(x, bits), torch.tensor(GOLDEN["activations"][str(bits)], **F64),
                               rtol=0, atol=1e-15)


def test_soft_cross_entropy_matches_official():
    logits = torch.sin(torch.arange(12.0, **F64)).reshape(3, 4)
    target = torch.softmax(torch.cos(torch.arange(12.0, **F64)).reshape(3, 4), 1)
    assert soft_cross_entropy(logits, target).mean().item() == pytest.approx(GOLDEN["soft_ce"], abs=1e-15)


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
    torch.testing.assert_close(logits, torch.tensor(GOLDEN["eval_logits"][str(bits)], **F64), rtol=0, atol=1e-13)


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
    for bits, loss in GOLDEN["step_losses"].items():
        assert trainer.callback_metrics[f"train/loss_bit{bits}"].item() == pytest.approx(loss, abs=1e-14)
    model.eval()
    with torch.no_grad():
        for bits in BITS:
            set_bits(model.backbone, bits)
            torch.testing.assert_close(model(golden_inputs())[:2].flatten(),
                                       torch.tensor(GOLDEN["after_step_logits"][str(bits)], **F64), rtol=0, atol=1e-13)
    state = model.backbone.state_dict()
    for key, first3 in GOLDEN["after_step_running_mean_first3"].items():
        torch.testing.assert_close(state[key][:3], torch.tensor(first3, **F64), rtol=0, atol=1e-15)
