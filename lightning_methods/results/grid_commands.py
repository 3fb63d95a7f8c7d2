"""Commands other than ``fit`` that ``lightning-methods grid --command NAME`` runs over seeds: how to resolve a config
of the command, where a run's files go, when it is finished and how to start it.

- ``ood`` (EncMin2L, :mod:`lightning_methods.ood.cli`): the run's pipeline directory is ``<run>/ood`` (its own
  :class:`~lightning_methods.runs.StagedRun`, beside the grid's ``<run>/state.json``); finished when its report stage
  is recorded; its record is ``<run>/ood/report/results.json`` (read by ``lightning-methods table`` through
  :mod:`lightning_methods.results.multistage`). Seed key: ``seed``.
- ``fed`` (FedFree and its baselines, :mod:`lightning_methods.federated.cli`): the run's federated directory is
  ``<run>/fed`` (one subdirectory per algorithm, each its own StagedRun); finished when ``comparison.csv`` (written
  after the last algorithm) exists; one record per algorithm, ``<run>/fed/<algorithm>/results.json``. Seed keys:
  ``data.seed`` (partition, data order) and ``federation.seed`` (models, families, server pseudo-data).

The ``fit`` command is :mod:`lightning_methods.results.grid`'s own; a run's command is written on the first line of
its ``run.yaml`` (``# command: ood``), so ``lightning-methods grid --run RUN_DIR`` knows it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HEADER = "# command: "


@dataclass(frozen=True)
class GridCommand:
    """How the grid runs one command (see the module docstring)."""

    name: str
    seed_keys: tuple[str, ...]
    resolve: Callable[[list[str]], dict[str, Any]]
    place: Callable[[dict[str, Any], Path], None]
    finished: Callable[[Path], bool]
    run: Callable[[Path, Path], None]
    record: Callable[[Path], Path]


def _ood_resolve(args: list[str]) -> dict[str, Any]:
    from lightning_methods.ood.cli import build_parser

    parser = build_parser()
    return yaml.safe_load(parser.dump(parser.parse_args(args), skip_none=False))


def _ood_place(cfg: dict[str, Any], run_dir: Path) -> None:
    cfg["run_dir"] = str(run_dir / "ood")
    cfg.pop("config", None)
    trainer = cfg.get("trainer") or {}
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
            logger.setdefault("init_args", {})["save_dir"] = str(run_dir)


def _ood_finished(run_dir: Path) -> bool:
    state = run_dir / "ood" / "state.json"
    try:
        stages = json.loads(state.read_text()).get("stages", {}) if state.is_file() else {}
    except json.JSONDecodeError:
        return False
    return "report" in stages and (run_dir / "ood" / "report" / "results.json").is_file()


def _ood_run(config_file: Path, run_dir: Path) -> None:
    from lightning_methods.ood.cli import run_ood

    run_ood(["--config", str(config_file)])


def _fed_resolve(args: list[str]) -> dict[str, Any]:
    from lightning_methods.federated.cli import build_parser

    parser = build_parser()
    return yaml.safe_load(parser.dump(parser.parse_args(args), skip_none=False))


def _fed_place(cfg: dict[str, Any], run_dir: Path) -> None:
    cfg["run_dir"] = str(run_dir / "fed")
    cfg.pop("config", None)
    logger = cfg.get("logger")
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
        logger.setdefault("init_args", {})["save_dir"] = str(run_dir)


def _fed_run(config_file: Path, run_dir: Path) -> None:
    from lightning_methods.federated.cli import run

    run(["--config", str(config_file)])


def _fed_record(run_dir: Path) -> Path:
    files = sorted((run_dir / "fed").glob("*/results.json"))
    return files[0] if files else run_dir / "fed" / "results.json"


COMMANDS: dict[str, GridCommand] = {
    "ood": GridCommand(
        "ood",
        ("seed",),
        _ood_resolve,
        place=_ood_place,
        finished=_ood_finished,
        run=_ood_run,
        record=lambda run_dir: run_dir / "ood" / "report" / "results.json",
    ),
    "fed": GridCommand(
        "fed",
        ("data.seed", "federation.seed"),
        _fed_resolve,
        place=_fed_place,
        finished=lambda run_dir: (run_dir / "fed" / "comparison.csv").is_file(),
        run=_fed_run,
        record=_fed_record,
    ),
}


def command_of(config_file: Path) -> str:
    """The command named on the first line of a prepared ``run.yaml`` (``"fit"`` when none is named)."""
    with open(config_file) as f:
        first = f.readline()
    return first[len(HEADER):].strip() if first.startswith(HEADER) else "fit"
