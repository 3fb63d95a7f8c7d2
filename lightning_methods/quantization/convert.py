"""Turn a float network into a multi-bit one: ``quantize_model(model, bits, ...)``.

Every ``nn.Conv2d`` / ``nn.Linear`` (exact types: subclasses may bypass ``forward``, e.g. the output projection of
``nn.MultiheadAttention``) becomes a :class:`~lightning_methods.layers.quantized.QuantConv2d` /
:class:`~lightning_methods.layers.quantized.QuantLinear` that shares the float Parameter objects, so parameter names,
checkpoints and optimizer groups are unchanged. As in Any-Precision DNNs (arXiv 1911.07346, official code
SHI-Labs/Any-Precision-DNNs) the first layer (the stem conv, or a ViT's patch embedding) and the last layer (the
classifier) stay in full precision, and the 1x1 projection shortcuts keep float weights (but read quantized
activations) with a plain BatchNorm. The quantized layers quantize their *input* activations: for post-ReLU inputs
``"unsigned"`` (clamp to [0, 1], as Any-Precision's ``Activate``) is exact, since ``clamp(relu(x), 0, 1) =
clamp(x, 0, 1)``; ViT blocks read signed inputs and use ``act_quant="signed"`` (our choice).

BatchNorm: ``shared_bn=True`` keeps one BatchNorm per site (EMQ, arXiv 2510.20673: the parameter count equals the
float model's); ``shared_bn=False`` gives one BatchNorm per trained bit-width (Any-Precision's switchable BN).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch

from torch import nn

from lightning_methods.layers.quantized import (
    ActQuant,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    SwitchableBatchNorm,
    check_bits,
    set_bits,
)

#: 1x1 projection shortcuts of the package's ResNets (pre-activation, CIFAR, ResNet-18/50, WideResNet): float weights
DEFAULT_FLOAT_WEIGHT_LAYERS = ("*skip_conv", "*shortcut.0", "*downsample.0", "*convShortcut")
#: the BatchNorm after each projection shortcut: never switched (Any-Precision keeps a plain ``skip_bn``)
DEFAULT_PLAIN_BN_LAYERS = ("*skip_bn", "*shortcut.1", "*downsample.1")

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(
    model: nn.Module,
    bits: Sequence[int],
    *,
    shared_bn: bool = True,
    wbc: bool = False,
    act_quant: ActQuant = "unsigned",
    keep_first: bool = True,
    keep_last: bool = True,
    float_layers: Sequence[str] = (),
    float_weight_layers: Sequence[str] | None = None,
    plain_bn_layers: Sequence[str] | None = None,
    wbc_eps: float = 1e-8,
    wbc_max_ratio: float | None = None,
    clamp_full_precision: bool = False,
    quantizer: Quantizer = "dorefa",
) -> nn.Module:
    """Convert ``model`` in place into a multi-bit network and return it (set to its highest bit-width).

    Args:
        model: a float network (any package backbone, a timm model, your own ``nn.Module``).
        bits: the trained bit-widths (1..32; 32 = full precision); switchable BatchNorms get one copy per entry.
        shared_bn: one BatchNorm per site for all bit-widths (EMQ); ``False``: switchable BN (Any-Precision).
        wbc: apply EMQ's weight bias correction in every quantized layer.
        act_quant: quantization of the quantized layers' input activations: ``"unsigned"`` (post-ReLU networks),
            ``"signed"`` (e.g. ViTs) or ``"none"`` (weights only).
        keep_first: leave the first ``Conv2d``/``Linear`` (registration order: the stem) entirely in float.
        keep_last: leave the last ``Conv2d``/``Linear`` (the classifier) entirely in float.
        float_layers: further ``fnmatch`` patterns of layer names to leave entirely in float.
        float_weight_layers: patterns of layers that keep float weights but quantize their input activations
            (default :data:`DEFAULT_FLOAT_WEIGHT_LAYERS`, the 1x1 projection shortcuts; ``[]`` quantizes them too).
        plain_bn_layers: patterns of BatchNorms that are never switched (default :data:`DEFAULT_PLAIN_BN_LAYERS`).
        wbc_eps: epsilon of WBC's standard-deviation ratio (1e-8).
        wbc_max_ratio: optional clamp of WBC's ratio (None: no clamp).
        clamp_full_precision: clamp the quantized layers' inputs at 32 bits too (Any-Precision's paper; their
            official code and the default keep the plain ReLU at 32 bits; DoReFa only).
        quantizer: ``"dorefa"``, Any-Precision's quantizers (tanh weights, activations clamped to [0, 1]), or
            ``"lsq"``, learned step sizes (Esser et al., ICLR 2020) with one weight step and one input step per
            trained bit-width below 32 in every quantized layer (as in MultiQuant, Xu et al., IJCAI 2022); an
            untrained bit-width uses the nearest trained one's step, rescaled to the same clip range.

    Raises:
        ValueError: for a bit-width outside 1..32, an empty bit list, or a model in which no layer is left to
            quantize (the message lists the layers found and the exclusions to relax).
    """
    bits = list(bits)
    if not bits:
        raise ValueError("bits is empty: give the trained bit-widths, e.g. [1, 2, 4, 8, 32]")
    check_bits(bits, "every trained bit-width")
    float_weight_layers = DEFAULT_FLOAT_WEIGHT_LAYERS if float_weight_layers is None else tuple(float_weight_layers)
    plain_bn_layers = DEFAULT_PLAIN_BN_LAYERS if plain_bn_layers is None else tuple(plain_bn_layers)
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    skip = set(float_layers)
    if layers and keep_first:
        skip.add(layers[0][0])
    if layers and keep_last:
        skip.add(layers[-1][0])
    quant = dict(act_quant=act_quant, wbc=wbc, wbc_eps=wbc_eps, wbc_max_ratio=wbc_max_ratio,
                 clamp_full_precision=clamp_full_precision, quantizer=quantizer, lsq_bits=bits)
    converted = 0
    for name, module in layers:
        if name in skip or _matches(name, tuple(float_layers)):
            continue
        weights = not _matches(name, float_weight_layers)
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        _replace(model, name, cls.from_float(module, quantize_weights=weights, **quant))
        converted += weights
    if converted == 0:
        found = ", ".join(n for n, _ in layers) or "none"
        raise ValueError(
            f"{type(model).__name__} has no layer left to quantize: nn.Conv2d / nn.Linear layers found: {found}; "
            f"kept in float: first={keep_first}, last={keep_last}, float_layers={list(float_layers)}, "
            f"float_weight_layers={list(float_weight_layers)}. Use a backbone with hidden Conv2d/Linear layers, or "
            "relax keep_first / keep_last / the patterns."
        )
    if not shared_bn:
        for name, module in list(model.named_modules()):
            if type(module) in _BN_TYPES and not _matches(name, plain_bn_layers):
                _replace(model, name, SwitchableBatchNorm(module, bits))
    set_bits(model, max(bits))
    return model


def classifier_layer(model: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` (quantized or not) in registration order: the classifier, whose input GraNd reads."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
