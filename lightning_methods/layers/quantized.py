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

LSQ (``quantizer="lsq"``; Esser et al., *Learned Step Size Quantization*, ICLR 2020, arXiv 1902.08153), with one
learned step size per trained bit-width and layer as in MultiQuant (Xu et al., IJCAI 2022): the spec's optional
alternative to DoReFa (see :func:`lsq_quantize`).

Pure functions (``quantize_weight``, ``quantize_activation``, ``weight_bias_correction``, ``lsq_quantize``) plus thin
modules (:class:`QuantConv2d`, :class:`QuantLinear`, :class:`SwitchableBatchNorm`); :func:`set_bits` switches a whole
model.
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
Quantizer = Literal["dorefa", "lsq"]


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


def lsq_levels(bits: int, signed: bool) -> tuple[int, int]:
    """LSQ's clip bounds ``(Q_N, Q_P)``: ``v / s`` is clipped to ``[-Q_N, Q_P]``. Signed: ``(2^(b-1), 2^(b-1) - 1)``;
    unsigned: ``(0, 2^b - 1)``. Signed 1 bit, where that rule leaves the single level 0, is ``(1, 1)`` with the two
    levels ``-s`` and ``+s`` (no zero; our choice, the binary case of the DoReFa quantizer too)."""
    if signed:
        return (1, 1) if bits == 1 else (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return 0, 2**bits - 1


def lsq_init(x: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """LSQ's initial step size ``2 mean|x| / sqrt(Q_P)`` (from the weights, or from the first batch of activations)."""
    return 2 * x.detach().abs().mean() / lsq_levels(bits, signed)[1] ** 0.5


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass, its gradient multiplied by ``scale`` in the backward pass."""
    y = x * scale
    return (x - y).detach() + y


def _floor_ste(x: torch.Tensor, low: float) -> torch.Tensor:
    """``max(x, low)`` in the forward pass, the identity in the backward pass: a step size that an optimizer pushed to
    0 or below (Adam moves every parameter by about its learning rate, whatever the gradient's scale) quantizes with
    a tiny positive step and keeps a gradient that can bring it back (with a clamp's zero gradient it would stay)."""
    return x + (x.clamp(min=low) - x).detach()


def lsq_quantize(v: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, grad_scale: float = 1.0
                 ) -> torch.Tensor:
    """LSQ (Esser et al., ICLR 2020, eq. 1-2): ``round(clip(v / s, -Q_N, Q_P)) s`` with ``round`` passed straight
    through, so ``d/dv`` is 1 inside the clip range and 0 outside, and ``d/ds`` is ``round(v / s) - v / s`` inside,
    ``-Q_N`` or ``Q_P`` outside (eq. 3), multiplied by ``grad_scale`` (the paper's ``g = 1 / sqrt(N Q_P)``, N the
    number of weights or of features of a sample). Signed 1 bit: the levels ``-s``, ``+s`` (see :func:`lsq_levels`).

    Args:
        v: the tensor to quantize.
        step: the step size ``s`` (a scalar tensor, usually a Parameter; used as at least the dtype's epsilon).
        bits: 1..31.
        signed: signed levels (weights, signed activations) or unsigned (post-ReLU activations).
        grad_scale: the factor of ``step``'s gradient.
    """
    s = _scale_grad(_floor_ste(step, torch.finfo(step.dtype).eps), grad_scale)
    compute = v.float() if bits > 8 and v.dtype in (torch.float16, torch.bfloat16) else v
    if signed and bits == 1:  # {-s, +s}: round a unit interval to its two ends
        q = 2 * _RoundSTE.apply(torch.clamp((compute / s + 1) / 2, 0.0, 1.0), 1.0) - 1
    else:
        q_n, q_p = lsq_levels(bits, signed)
        q = _RoundSTE.apply(torch.clamp(compute / s, -q_n, q_p), 1.0)
    return (q * s).to(v.dtype)


def _owner_bits(bits: int, learned: list[int]) -> int:
    """The learned bit-width whose step serves ``bits``: itself, else the nearest learned one above, else below."""
    if bits in learned:
        return bits
    above = [b for b in learned if b > bits]
    return above[0] if above else learned[-1]


class MultiBitModule:
    """Mixin of every module whose computation depends on the current bit-width ``bits``."""

    bits: int = FULL_PRECISION


class _QuantMixin(MultiBitModule):
    """Shared part of the quantized Conv2d / Linear: weight quantizer (+ WBC) and input activation quantizer."""

    def _init_quant(self, *, quantize_weights: bool = True, act_quant: ActQuant = "unsigned", wbc: bool = False,
                    wbc_eps: float = 1e-8, wbc_max_ratio: float | None = None,
                    clamp_full_precision: bool = False, quantizer: Quantizer = "dorefa",
                    lsq_bits: Iterable[int] = ()) -> None:
        if act_quant not in ("unsigned", "signed", "none"):
            raise ValueError(f"act_quant must be 'unsigned', 'signed' or 'none', got {act_quant!r}")
        if wbc_max_ratio is not None and wbc_max_ratio <= 0:
            raise ValueError(f"wbc_max_ratio must be positive or None, got {wbc_max_ratio}")
        if quantizer not in ("dorefa", "lsq"):
            raise ValueError(f"quantizer must be 'dorefa' or 'lsq', got {quantizer!r}")
        lsq_bits = sorted({b for b in lsq_bits if b < FULL_PRECISION})
        check_bits(lsq_bits, "every bit-width with a learned LSQ step (lsq_bits)")
        if quantizer == "lsq" and not lsq_bits:
            raise ValueError("quantizer 'lsq' needs the trained bit-widths below 32 (lsq_bits), one learned step "
                             "size each, e.g. lsq_bits=[1, 2, 4, 8]")
        if quantizer == "lsq" and clamp_full_precision:
            raise ValueError("clamp_full_precision clamps to the DoReFa quantizer's [0, 1] range; LSQ learns its "
                             "range: use quantizer 'dorefa' or clamp_full_precision false")
        self.bits = FULL_PRECISION
        self.quantize_weights, self.act_quant = quantize_weights, act_quant
        self.wbc, self.wbc_eps, self.wbc_max_ratio = wbc, wbc_eps, wbc_max_ratio
        self.clamp_full_precision = clamp_full_precision
        self.quantizer, self.lsq_bits = quantizer, lsq_bits
        self._make_lsq_steps()

    def _make_lsq_steps(self) -> None:
        """One step-size Parameter per learned bit-width for the weights and for the inputs (LSQ only), on the
        weight's device. A step of exactly 0 is not initialized yet: its first forward pass sets it."""
        self._lsq_ready: set[tuple[str, int]] = set()
        if self.quantizer != "lsq":
            return
        w = self.weight  # type: ignore[attr-defined]
        def steps() -> nn.ParameterDict:
            return nn.ParameterDict({str(b): nn.Parameter(torch.zeros((), device=w.device, dtype=w.dtype))
                                     for b in self.lsq_bits})
        if self.quantize_weights:
            self.weight_step = steps()
        if self.act_quant != "none":
            self.act_step = steps()

    def _lsq_step(self, kind: Literal["weight", "act"], x: torch.Tensor, signed: bool) -> torch.Tensor | None:
        """The step size of the current bit-width: its own learned one, or for an untrained bit-width the nearest
        learned one (above, else below) rescaled to keep its clip range ``Q_P s`` (our choice). An uninitialized
        step is set from ``x`` (:func:`lsq_init`; activations: the mean over the ranks of a process group, so that
        first forward pass at a bit-width must run on every rank, as every training step and BN recalibration do)."""
        owner = _owner_bits(self.bits, self.lsq_bits)
        step = (self.weight_step if kind == "weight" else self.act_step)[str(owner)]
        if (kind, owner) not in self._lsq_ready:
            if float(step.detach()) == 0.0:
                value = lsq_init(x, owner, signed).to(step.dtype)
                if kind == "act" and torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(value)
                    value /= torch.distributed.get_world_size()
                if value == 0:  # an all-zero input quantizes to itself at any step: set the step from a later one
                    return None
                with torch.no_grad():
                    step.copy_(value)
            self._lsq_ready.add((kind, owner))
        if owner == self.bits:
            return step
        return step * (lsq_levels(owner, signed)[1] / lsq_levels(self.bits, signed)[1])

    def _lsq(self, kind: Literal["weight", "act"], x: torch.Tensor, signed: bool, features: int) -> torch.Tensor:
        step = self._lsq_step(kind, x, signed)
        if step is None:
            return x
        return lsq_quantize(x, step, self.bits, signed, 1.0 / (features * lsq_levels(self.bits, signed)[1]) ** 0.5)

    def quantized_weight(self) -> torch.Tensor:
        """The weight used at the current bit-width (float weights when ``quantize_weights`` is off)."""
        w = self.weight  # type: ignore[attr-defined]
        if not self.quantize_weights:
            return w
        if self.quantizer == "lsq":
            q = w if self.bits >= FULL_PRECISION else self._lsq("weight", w, True, w.numel())
        else:
            q = quantize_weight(w, self.bits)
        if self.wbc:
            q = weight_bias_correction(q, w, self.wbc_eps, self.wbc_max_ratio)
        return q

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input activations at the current bit-width (the identity at 32 bits unless ``clamp_full_precision``)."""
        if self.quantizer == "lsq":
            if self.act_quant == "none" or self.bits >= FULL_PRECISION:
                return x
            return self._lsq("act", x, self.act_quant == "signed", x[0].numel())
        return quantize_activation(x, self.bits, self.act_quant, self.clamp_full_precision)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._lsq_ready = set()  # the loaded steps decide again which are initialized
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]

    def extra_repr(self) -> str:
        lsq = f", quantizer='lsq', lsq_bits={self.lsq_bits}" if self.quantizer == "lsq" else ""
        return (f"{super().extra_repr()}, bits={self.bits}, quantize_weights={self.quantize_weights}, "  # type: ignore[misc]
                f"act_quant={self.act_quant!r}, wbc={self.wbc}, clamp_full_precision={self.clamp_full_precision}"
                f"{lsq}")

    @classmethod
    def from_float(cls, module: nn.Module, **quant: Any) -> nn.Module:
        """A quantized twin of the float ``module`` that shares its ``weight`` / ``bias`` Parameter objects."""
        extra = {"padding_mode": module.padding_mode} if isinstance(module, nn.Conv2d) else {}
        new = cls(*cls._float_args(module), bias=module.bias is not None, device="meta", **extra, **quant)
        new.weight, new.bias = module.weight, module.bias
        new._make_lsq_steps()  # on the float weight's device and dtype
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
        clamp_full_precision: clamp the inputs at 32 bits too (see ``quantize_activation``; DoReFa only).
        quantizer: ``"dorefa"`` (Any-Precision's quantizers) or ``"lsq"`` (learned step sizes, :func:`lsq_quantize`).
        lsq_bits: the bit-widths below 32 with a learned LSQ step each (the trained ones); others use the nearest.
    """

    def __init__(self, *args: Any, quantize_weights: bool = True, act_quant: ActQuant = "unsigned", wbc: bool = False,
                 wbc_eps: float = 1e-8, wbc_max_ratio: float | None = None, clamp_full_precision: bool = False,
                 quantizer: Quantizer = "dorefa", lsq_bits: Iterable[int] = (), **kwargs: Any) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_quant(quantize_weights=quantize_weights, act_quant=act_quant, wbc=wbc, wbc_eps=wbc_eps,
                         wbc_max_ratio=wbc_max_ratio, clamp_full_precision=clamp_full_precision,
                         quantizer=quantizer, lsq_bits=lsq_bits)

    @staticmethod
    def _float_args(m: nn.Conv2d) -> tuple:
        return m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose weights (and inputs) are quantized to the current bit-width (arguments as
    :class:`QuantConv2d`; WBC is per output feature)."""

    def __init__(self, *args: Any, quantize_weights: bool = True, act_quant: ActQuant = "unsigned", wbc: bool = False,
                 wbc_eps: float = 1e-8, wbc_max_ratio: float | None = None, clamp_full_precision: bool = False,
                 quantizer: Quantizer = "dorefa", lsq_bits: Iterable[int] = (), **kwargs: Any) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_quant(quantize_weights=quantize_weights, act_quant=act_quant, wbc=wbc, wbc_eps=wbc_eps,
                         wbc_max_ratio=wbc_max_ratio, clamp_full_precision=clamp_full_precision,
                         quantizer=quantizer, lsq_bits=lsq_bits)

    @staticmethod
    def _float_args(m: nn.Linear) -> tuple:
        return (m.in_features, m.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


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
