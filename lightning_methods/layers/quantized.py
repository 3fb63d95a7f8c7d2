"""Multi-bit ("any-precision") quantized layers: one set of float weights that runs at any bit-width.

Quantizers follow Any-Precision DNNs (Yu et al., arXiv 1911.07346; official code SHI-Labs/Any-Precision-DNNs,
``models/quan_ops.py``), which adapts DoReFa-Net (arXiv 1606.06160):

- weights at k < 32 bits: ``w' = tanh(w) / (2 max|tanh(w)|) + 0.5``, ``q = round(w' (2^k - 1)) / (2^k - 1)``,
  ``w_q = (2q - 1) E`` with ``E = mean|w|`` (detached, per tensor); at 32 bits ``w_q = tanh(w) / max|tanh(w)| E``;
- activations at k < 32 bits: ``clamp(x, 0, 1)`` rounded to k bits (``"unsigned"``), or ``clamp(x, -1, 1)`` rounded
  to 2^k - 1 symmetric levels (``"signed"``, our choice for inputs that are not post-ReLU, e.g. ViT blocks); at 32
  bits the identity (the network's own ReLU acts);
- ``round`` has a straight-through estimator (identity gradient).

Weight bias correction (WBC) of EMQ (Kim, An, Jeon, Ko, *Efficient Multi-bit Quantization Network Training via Weight
Bias Correction and Bit-wise Coreset Sampling*, NeurIPS 2025, arXiv 2510.20673) matches every output channel's mean
and standard deviation of the de-quantized weights to the float weights, so one shared BatchNorm serves all bit-widths.

Pure functions (``quantize_weight``, ``quantize_activation``, ``weight_bias_correction``) plus thin modules
(:class:`QuantConv2d`, :class:`QuantLinear`, :class:`SwitchableBatchNorm`); :func:`set_bits` switches a whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

FULL_PRECISION = 32
ActQuant = Literal["unsigned", "signed", "none"]


def check_bits(bits: int | Iterable[int], what: str = "bit-width") -> None:
    """Raise ``ValueError`` unless every value is an integer in 1..32 (32 = full precision)."""
    for b in list(bits) if isinstance(bits, Iterable) and not isinstance(bits, str) else [bits]:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= FULL_PRECISION:
            raise ValueError(f"{what} must be an integer in 1..32 (32 = full precision), got {b!r}")


class _RoundSTE(torch.autograd.Function):
    """``round(x * n) / n`` forward, identity backward (the official ``qfn``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n: float) -> torch.Tensor:
        return torch.round(x * n) / n

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def quantize_unit(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round values in [0, 1] to the 2^k levels ``{0, 1/(2^k - 1), ..., 1}`` with a straight-through gradient."""
    n = float(2**bits - 1)
    if bits > 8 and x.dtype in (torch.float16, torch.bfloat16):  # half types cannot hold the finer grids
        return _RoundSTE.apply(x.float(), n).to(x.dtype)
    return _RoundSTE.apply(x, n)


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Any-Precision / DoReFa weight quantizer (see the module docstring); at most 2^k distinct values for k < 32."""
    scale = w.abs().mean().detach()
    t = torch.tanh(w)
    if bits >= FULL_PRECISION:
        return t / t.abs().max() * scale
    unit = t / 2 / t.abs().max() + 0.5
    return (2 * quantize_unit(unit, bits) - 1) * scale


def quantize_activation(x: torch.Tensor, bits: int, mode: ActQuant = "unsigned",
                        clamp_full_precision: bool = False) -> torch.Tensor:
    """Activation quantizer: with ``mode="none"`` the identity; at 32 bits the identity (Any-Precision's official
    code: the network's ReLU acts), or with ``clamp_full_precision`` the clamp alone (their paper's variant, which
    keeps the full-precision child's activation range equal to the quantized children's); below 32 bits clamp to
    [0, 1] (``"unsigned"``) or [-1, 1] (``"signed"``) and round to k bits, with a straight-through gradient inside
    the clamp range."""
    if mode == "none" or (bits >= FULL_PRECISION and not clamp_full_precision):
        return x
    if mode not in ("unsigned", "signed"):
        raise ValueError(f"activation quantization mode must be 'unsigned', 'signed' or 'none', got {mode!r}")
    low = 0.0 if mode == "unsigned" else -1.0
    x = torch.clamp(x, low, 1.0)
    if bits >= FULL_PRECISION:
        return x
    if mode == "unsigned":
        return quantize_unit(x, bits)
    return 2 * quantize_unit((x + 1) / 2, bits) - 1


def weight_bias_correction(q: torch.Tensor, w: torch.Tensor, eps: float = 1e-8,
                           max_ratio: float | None = None) -> torch.Tensor:
    """EMQ's weight bias correction per output channel c (dimension 0):
    ``Q~_c = (Q_c - mean(Q_c)) std(W_c) / (std(Q_c) + eps) + mean(W_c)`` (population std; differentiable).

    Args:
        q: de-quantized weights, shape ``(out, ...)``.
        w: the float weights ``q`` was computed from, same shape.
        eps: added to std(Q_c), which is 0 for a constant channel (1 bit, all weights of one sign).
        max_ratio: optional upper clamp of ``std(W_c) / (std(Q_c) + eps)`` (our choice), against exploding gradients.

    Raises:
        ValueError: if the shapes differ.
    """
    if q.shape != w.shape:
        raise ValueError(f"weight_bias_correction needs q and w of one shape, got {tuple(q.shape)} and "
                         f"{tuple(w.shape)}")
    dims = tuple(range(1, w.ndim))
    q_std, q_mean = torch.std_mean(q, dim=dims, correction=0, keepdim=True)
    w_std, w_mean = torch.std_mean(w, dim=dims, correction=0, keepdim=True)
    ratio = w_std / (q_std + eps)
    if max_ratio is not None:
        ratio = ratio.clamp(max=max_ratio)
    return (q - q_mean) * ratio + w_mean


class MultiBitModule:
    """Mixin of every module whose computation depends on the current bit-width ``bits``."""

    bits: int = FULL_PRECISION


class _QuantMixin(MultiBitModule):
    """Shared part of the quantized Conv2d / Linear: weight quantizer (+ WBC) and input activation quantizer."""

    def _init_quant(self, *, quantize_weights: bool = True, act_quant: ActQuant = "unsigned", wbc: bool = False,
                    wbc_eps: float = 1e-8, wbc_max_ratio: float | None = None,
                    clamp_full_precision: bool = False) -> None:
        if act_quant not in ("unsigned", "signed", "none"):
            raise ValueError(f"act_quant must be 'unsigned', 'signed' or 'none', got {act_quant!r}")
        if wbc_max_ratio is not None and wbc_max_ratio <= 0:
            raise ValueError(f"wbc_max_ratio must be positive or None, got {wbc_max_ratio}")
        self.bits = FULL_PRECISION
        self.quantize_weights, self.act_quant = quantize_weights, act_quant
        self.wbc, self.wbc_eps, self.wbc_max_ratio = wbc, wbc_eps, wbc_max_ratio
        self.clamp_full_precision = clamp_full_precision

    def quantized_weight(self) -> torch.Tensor:
        """The weight used at the current bit-width (float weights when ``quantize_weights`` is off)."""
        w = self.weight  # type: ignore[attr-defined]
        if not self.quantize_weights:
            return w
        q = quantize_weight(w, self.bits)
        if self.wbc:
            q = weight_bias_correction(q, w, self.wbc_eps, self.wbc_max_ratio)
        return q

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, bits={self.bits}, quantize_weights={self.quantize_weights}, "  # type: ignore[misc]
                f"act_quant={self.act_quant!r}, wbc={self.wbc}, clamp_full_precision={self.clamp_full_precision}")

    @classmethod
    def from_float(cls, module: nn.Module, **quant: Any) -> nn.Module:
        """A quantized twin of the float ``module`` that shares its ``weight`` / ``bias`` Parameter objects."""
        extra = {"padding_mode": module.padding_mode} if isinstance(module, nn.Conv2d) else {}
        new = cls(*cls._float_args(module), bias=module.bias is not None, device="meta", **extra, **quant)
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weights (and inputs) are quantized to the current bit-width ``bits``.

    Args:
        *args, **kwargs: ``nn.Conv2d`` arguments.
        quantize_weights: quantize the weights (``False`` keeps float weights, e.g. the 1x1 shortcut convolutions of
            Any-Precision, which still read quantized activations).
        act_quant: quantization of the input activations (``"unsigned"``, ``"signed"``, ``"none"``).
        wbc: apply EMQ's weight bias correction after de-quantization (at every bit-width, 32 included).
        wbc_eps: epsilon of the corrected standard deviation ratio.
        wbc_max_ratio: optional clamp of the ratio.
        clamp_full_precision: clamp the inputs at 32 bits too (see ``quantize_activation``).
    """

    def __init__(self, *args: Any, quantize_weights: bool = True, act_quant: ActQuant = "unsigned", wbc: bool = False,
                 wbc_eps: float = 1e-8, wbc_max_ratio: float | None = None, clamp_full_precision: bool = False,
                 **kwargs: Any) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_quant(quantize_weights=quantize_weights, act_quant=act_quant, wbc=wbc, wbc_eps=wbc_eps,
                         wbc_max_ratio=wbc_max_ratio, clamp_full_precision=clamp_full_precision)

    @staticmethod
    def _float_args(m: nn.Conv2d) -> tuple:
        return m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activation(x, self.bits, self.act_quant, self.clamp_full_precision)
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose weights (and inputs) are quantized to the current bit-width (arguments as
    :class:`QuantConv2d`; WBC is per output feature)."""

    def __init__(self, *args: Any, quantize_weights: bool = True, act_quant: ActQuant = "unsigned", wbc: bool = False,
                 wbc_eps: float = 1e-8, wbc_max_ratio: float | None = None, clamp_full_precision: bool = False,
                 **kwargs: Any) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_quant(quantize_weights=quantize_weights, act_quant=act_quant, wbc=wbc, wbc_eps=wbc_eps,
                         wbc_max_ratio=wbc_max_ratio, clamp_full_precision=clamp_full_precision)

    @staticmethod
    def _float_args(m: nn.Linear) -> tuple:
        return (m.in_features, m.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activation(x, self.bits, self.act_quant, self.clamp_full_precision)
        return F.linear(x, self.quantized_weight(), self.bias)


class SwitchableBatchNorm(MultiBitModule, nn.Module):
    """One BatchNorm per trained bit-width (Any-Precision's ``SwitchBatchNorm2d``; same ``bn_dict`` layout).

    A bit-width without its own BatchNorm (an untrained, "calibrated" one) uses the BatchNorm of the nearest trained
    bit-width above it (the highest if none is above); recalibrate its statistics before evaluating it.

    Args:
        bn: the float BatchNorm (1d or 2d) to copy once per bit-width.
        bit_list: the trained bit-widths.
    """

    def __init__(self, bn: _BatchNorm, bit_list: Iterable[int]) -> None:
        super().__init__()
        self.bit_list = sorted(set(bit_list))
        check_bits(self.bit_list)
        self.bn_dict = nn.ModuleDict({str(b): copy.deepcopy(bn) for b in self.bit_list})
        self.bits = self.bit_list[-1]

    def owner_bits(self, bits: int) -> int:
        """The trained bit-width whose BatchNorm serves ``bits``."""
        above = [b for b in self.bit_list if b >= bits]
        return above[0] if above else self.bit_list[-1]

    def active(self) -> _BatchNorm:
        return self.bn_dict[str(self.owner_bits(self.bits))]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.active()(x)

    def extra_repr(self) -> str:
        return f"bit_list={self.bit_list}, bits={self.bits}"


def multibit_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` whose computation depends on the bit-width."""
    return [m for m in model.modules() if isinstance(m, MultiBitModule)]


def set_bits(model: nn.Module, bits: int) -> int:
    """Switch every multi-bit module of ``model`` to ``bits`` (1..32); returns the previous bit-width.

    Raises:
        ValueError: if ``bits`` is outside 1..32 or ``model`` has no multi-bit module (convert it first with
            ``lightning_methods.quantization.quantize_model``).
    """
    check_bits(bits)
    modules = multibit_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no multi-bit layer; convert it with "
                         "lightning_methods.quantization.quantize_model first")
    previous = modules[0].bits
    for m in modules:
        m.bits = bits
    return previous
