"""tests/test_configs.py hook for configs/federated/: these are ``lightning-methods-fed`` configs (a federated runner
config, not a ``fit`` config), covered by tests/federated/test_fedfree_configs.py (every one is parsed and
instantiated, and its first round runs on fake data)."""

from __future__ import annotations

from pathlib import Path

from config_overrides import register


@register("federated/")
def fedfree_hook(config_path: Path, tmp_path: Path, data_root: Path) -> list[str] | None:
    return None


fedfree_hook.reason = ("lightning-methods-fed config: covered by tests/federated/test_fedfree_configs.py::"
                       "test_config_parses and ::test_config_first_round_on_fake_data")
