"""Every shipped YAML under configs/ runs ``fit`` with ``fast_dev_run`` through ``main([...])``, on small fake data
written in the real CIFAR pickle format (so the real loading code runs)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from lightning_methods.cli import main, repeated_keys

from config_overrides import hook_for

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml") if p.parts[-2] != "base")


def _accepts(class_path: str, name: str) -> bool:
    """Whether the class at ``class_path`` (or a base class it forwards ``**kwargs`` to) takes argument ``name``."""
    module, _, attr = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), attr)
    return any(name in inspect.signature(c.__init__).parameters for c in cls.__mro__ if "__init__" in vars(c))


def fast_args(cfg: dict, data_root: Path, tmp_path: Path) -> list[str]:
    args = ["--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.precision=32-true", f"--trainer.default_root_dir={tmp_path}", "--test_after_fit=off"]
    data_args = (cfg.get("data") or {}).get("init_args") or {}
    if "data_dir" in data_args:
        args.append(f"--data.init_args.data_dir={data_root}")
        if _accepts(cfg["data"]["class_path"], "download"):  # file trees (ImageNet) have nothing to download
            args.append("--data.init_args.download=false")
    if "num_workers" in data_args:
        args.append("--data.init_args.num_workers=0")
    args.append("--data.init_args.batch_size=4")
    return args


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_fits(rel, fake_cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = CONFIG_DIR / rel
    cfg = yaml.safe_load(path.read_text())
    hook = hook_for(rel)
    extra = hook(path, tmp_path, fake_cifar_root[0]) if hook else []
    if extra is None:
        pytest.skip(f"not a fit config: {getattr(hook, 'reason', 'covered elsewhere')}")
    main(["fit", "--config", str(path), *fast_args(cfg, fake_cifar_root[0], tmp_path), *extra])


@pytest.mark.parametrize("rel", ["base/trainer.yaml", "base/wandb.yaml", "base/ddp.yaml"])
def test_base_configs_compose(rel, fake_cifar_root, tmp_path, monkeypatch):
    """The base files compose with a method config (ddp.yaml is parsed only: it needs GPUs)."""
    monkeypatch.chdir(tmp_path)
    method = CONFIG_DIR / "cifar100/resnet18.yaml"
    args = ["--config", str(CONFIG_DIR / rel), "--config", str(method)]
    cfg = yaml.safe_load(method.read_text())
    if rel == "base/ddp.yaml":
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *args, "--print_config"])
        assert exit_info.value.code in (0, None)
        return
    main(["fit", *args, *fast_args(cfg, fake_cifar_root[0], tmp_path)])


def test_no_shipped_config_repeats_a_key():
    """A repeated key is silently the last one for YAML loaders (the CLI refuses such a file, tests/core/test_cli.py);
    a shipped config with one would not say what it runs."""
    found = {p.relative_to(CONFIG_DIR).as_posix(): repeated_keys(p.read_text()) for p in CONFIG_DIR.rglob("*.yaml")}
    assert len(found) > 200 and {name: keys for name, keys in found.items() if keys} == {}

