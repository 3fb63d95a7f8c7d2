"""tests/core/test_configs.py hook for configs/quantization/: every config is a ``fit`` config and runs there; the
ResNet-20x5 ones run at width 0.25 (20/40/80 channels) so fast_dev_run stays cheap on a CPU (the full-width model is
converted and run in tests/quantization/test_multibit_layers.py::test_package_backbones_convert)."""

from __future__ import annotations

from pathlib import Path

from config_overrides import register


@register("quantization/")
def multibit_hook(config_path: Path, tmp_path: Path, data_root: Path) -> list[str]:
    if "resnet20x5" in config_path.read_text():
        return ['--model.init_args.backbone_kwargs={"width": 0.25}']
    return []
