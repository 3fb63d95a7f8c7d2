"""BatchNorm statistics of multi-bit networks: recalibration for a bit-width and per-bit statistic banks.

EMQ (Kim et al., NeurIPS 2025, arXiv 2510.20673) shares one BatchNorm across bit-widths (weight bias correction keeps
the children's activation statistics aligned) and finds BN adaptation helpful on top (its Table 6, unconfirmed);
Any-Precision (arXiv 1911.07346) keeps one BatchNorm per trained bit-width, so bit-widths it never trained need
recalibrated statistics. :func:`recalibrate_bn` resets the running statistics of the BatchNorms a bit-width uses and
re-estimates them as the cumulative average over calibration batches (``momentum=None``), without gradients.
:func:`bn_stats` / :func:`load_bn_stats` save and restore all running statistics, so each evaluated bit-width can
use its own calibrated statistics while training keeps the shared ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_methods.layers.quantized import set_bits


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm of ``model`` that tracks running statistics (the copies inside switchable BNs included)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def bn_stats(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the running statistics of every BatchNorm (mean, var, batch count per layer)."""
    return [t.detach().clone() for bn in batchnorms(model)
            for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


def load_bn_stats(model: nn.Module, stats: list[torch.Tensor]) -> None:
    """Write statistics saved by :func:`bn_stats` back (same model structure).

    Raises:
        ValueError: if ``stats`` does not fit the model's BatchNorms.
    """
    targets = [t for bn in batchnorms(model) for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    if len(targets) != len(stats):
        raise ValueError(f"the saved BatchNorm statistics hold {len(stats)} tensors, the model has {len(targets)}")
    with torch.no_grad():
        torch._foreach_copy_(targets, stats)


def recalibrate_bn(model: nn.Module, bits: int, batches: Iterable[torch.Tensor], n_batches: int = 50) -> int:
    """Re-estimate the running statistics of the BatchNorms used at ``bits`` from up to ``n_batches`` batches.

    Each BatchNorm that the forward pass at ``bits`` reaches is reset the first time it runs and then averages the
    batch statistics cumulatively (``momentum=None``): afterwards ``running_mean`` is the mean over the calibration
    batches of the per-batch means of its input, ``running_var`` the mean of the per-batch unbiased variances.
    BatchNorms not used at ``bits`` (other bit-widths' switchable copies) are untouched. The model's mode, momentum
    values and bit-width are restored afterwards.

    Args:
        model: a multi-bit network (see ``quantize_model``).
        bits: the bit-width to calibrate (1..32).
        batches: iterable of ready input tensors (normalized images, on the model's device).
        n_batches: the number of batches to use (50 by default, our choice).

    Returns:
        The number of samples forwarded.

    Raises:
        ValueError: if ``n_batches < 1`` or ``batches`` yields nothing.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    previous_bits, was_training = set_bits(model, bits), model.training
    momenta: dict[_BatchNorm, float | None] = {}

    def reset_on_first_use(bn: _BatchNorm, args: tuple) -> None:
        if bn not in momenta:
            momenta[bn] = bn.momentum
            bn.reset_running_stats()
            bn.momentum = None

    handles = [bn.register_forward_pre_hook(reset_on_first_use) for bn in batchnorms(model)]
    seen = 0
    try:
        model.train()
        with torch.no_grad():
            for i, x in enumerate(batches):
                if i >= n_batches:
                    break
                model(x)
                seen += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        model.train(was_training)
        set_bits(model, previous_bits)
    if seen == 0:
        raise ValueError("recalibrate_bn got no calibration batch")
    return seen
