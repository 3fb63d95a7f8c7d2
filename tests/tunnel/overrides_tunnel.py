"""tests/core/test_configs.py hook for configs/tunnel/: every config is a ``fit`` config and runs as shipped, with the
TunnelProbe callback shrunk for speed (8 training / 8 test samples per split, feature maps pooled to 1x1, 2 probe
epochs, a probe after the epoch, OOD data from the fake CIFAR root) and, for the CINIC-10 configs, a small CINIC-10
release written in the official folder layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from config_overrides import note_swap, register

sys.path.insert(0, str(Path(__file__).parent))
from tunnel_fakes import write_fake_cinic  # noqa: E402

SMALL = {"max_train_samples": 8, "max_test_samples": 8, "probe_epochs": 2, "extract_batch_size": 8, "pool_size": 1}


@register("tunnel/")
def tunnel_args(config_path: Path, tmp_path: Path, data_root: Path) -> list[str]:
    cfg = yaml.safe_load(config_path.read_text())
    callbacks = cfg["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith("TunnelProbe"):
            cb["init_args"]["every_n_epochs"] = 1
            cb["init_args"]["settings"] = {**cb["init_args"].get("settings", {}), **SMALL}
            ood = cb["init_args"].get("ood_data")
            if ood:
                ood["init_args"].update({"data_dir": str(data_root), "download": False, "num_workers": 0})
    rel = f"tunnel/{config_path.name}"
    note_swap(rel, f"TunnelProbe every_n_epochs 1, settings {SMALL}")
    args = [f"--trainer.callbacks={json.dumps(callbacks)}"]
    if "CINIC10" in cfg["data"]["class_path"]:
        cinic = tmp_path / "cinic"
        write_fake_cinic(cinic, per_class=2)
        args += [f"--data.init_args.data_dir={cinic}", "--data.init_args.download=false"]
    return args
