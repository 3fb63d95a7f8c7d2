"""Reusable layers shared by method families (e.g. multi-bit quantized Conv2d / Linear)."""

__all__: list[str] = []

from .quantized import (  # noqa: E402
    MultiBitModule,
    QuantConv2d,
    QuantLinear,
    SwitchableBatchNorm,
    check_bits,
    multibit_modules,
    quantize_activation,
    quantize_unit,
    quantize_weight,
    set_bits,
    weight_bias_correction,
)

__all__ += ["MultiBitModule", "QuantConv2d", "QuantLinear", "SwitchableBatchNorm", "check_bits", "multibit_modules",
            "quantize_activation", "quantize_unit", "quantize_weight", "set_bits", "weight_bias_correction"]
