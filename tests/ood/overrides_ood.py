"""tests/test_configs.py hook for configs/ood/: pipeline configs (with an ``encoders`` section) are
``lightning-methods-ood`` configs, not ``fit`` configs; RDM ``fit`` configs run ``fast_dev_run`` on tiny cached
features written here."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from config_overrides import register


@register("ood/")
def ood_hook(config_path: Path, tmp_path: Path, data_root: Path) -> list[str] | None:
    cfg = yaml.safe_load(config_path.read_text()) or {}
    if "encoders" in cfg:
        return None
    features = tmp_path / "features.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"features": torch.randn(16, 6, generator=g), "index": torch.arange(16),
                "targets": torch.arange(16) % 2}, features)
    return [f"--data.init_args.train_path={features}", "--model.init_args.dim=6", "--model.init_args.net.width=16",
            "--model.init_args.net.bottleneck=16", "--model.init_args.net.num_blocks=1",
            "--model.init_args.net.time_embed_dim=8"]


ood_hook.reason = ("lightning-methods-ood pipeline config: covered by tests/ood/test_ood_pipeline.py::"
                   "test_every_ood_config_parses_and_builds (all parsed) and ::test_demo_runs_every_stage_and_writes_"
                   "the_report (digits_demo.yaml runs end to end)")
