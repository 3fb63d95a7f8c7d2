"""tests/core/test_configs.py hook for configs/hpn/: every HPN config is a ``fit`` config and runs there; the
prototype optimisation of the HPN models is shortened (10,000 official steps cost seconds per config), the softmax
baseline and the regressor (no prototypes) run unchanged. The t-sweep runner over configs/hpn/digits_multitask.yaml is
covered by tests/hpn/test_hpn_sweep.py."""

from __future__ import annotations

from pathlib import Path

import yaml

from config_overrides import note_swap, register


@register("hpn/")
def hpn_hook(config_path: Path, tmp_path: Path, data_root: Path) -> list[str]:
    model = (yaml.safe_load(config_path.read_text()) or {}).get("model") or {}
    if "prototype_iterations" in (model.get("init_args") or {}):
        note_swap(f"hpn/{config_path.name}", "prototype_iterations 10000 -> 50")
        return ["--model.init_args.prototype_iterations=50"]
    return []
