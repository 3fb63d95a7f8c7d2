"""tests/core/test_configs.py hook for configs/noisy_labels/: the plain-CE baselines are ``fit`` configs and run
there; the multi-round Early Cutting configs (those with a ``selection:`` section) are ``lightning-methods-select``
configs, covered by tests/noisy_labels/test_early_cutting_select.py (every one is parsed and instantiated; two run end
to end)."""

from __future__ import annotations

from pathlib import Path

import yaml

from config_overrides import register


@register("noisy_labels/")
def early_cutting_hook(config_path: Path, tmp_path: Path, data_root: Path) -> list[str] | None:
    if "selection" in (yaml.safe_load(config_path.read_text()) or {}):
        return None
    return []


early_cutting_hook.reason = ("lightning-methods-select config: covered by tests/noisy_labels/"
                             "test_early_cutting_select.py::test_select_config_parses_and_instantiates and "
                             "::test_select_command_runs_end_to_end")
