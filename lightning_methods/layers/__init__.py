"""Reusable layers shared by method families (e.g. multi-bit quantized Conv2d / Linear)."""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.layers.quantized": (
            "MultiBitModule", "QuantConv2d", "QuantLinear", "SwitchableBatchNorm", "check_bits", "lsq_init",
            "lsq_levels", "lsq_quantize", "multibit_modules", "quantize_activation", "quantize_unit", "quantize_weight",
            "set_bits", "weight_bias_correction",
        ),
    },
)
