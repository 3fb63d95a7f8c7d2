"""Weights & Biases helpers shared by the CLI and the multi-stage runners (public W&B / Lightning API only)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger


def plain(value: Any) -> Any:
    """A config (namespaces, dicts, lists, paths, ...) as a JSON-safe nested structure of plain values."""

    def convert(v: Any) -> Any:
        if hasattr(v, "as_dict") and callable(v.as_dict):
            v = v.as_dict()
        if isinstance(v, Mapping):
            return {str(k): convert(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v

    return json.loads(json.dumps(convert(value), default=str))


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    """The ``WandbLogger`` instances among ``loggers``."""
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def log_config(loggers: Iterable[Logger], config: Mapping[str, Any]) -> None:
    """Write ``config`` into the run config of every W&B logger (the resolved config of a run, on rank zero)."""
    for logger in wandb_loggers(loggers):
        logger.experiment.config.update(plain(config), allow_val_change=True)


def finish_open_run(exit_code: int = 0) -> None:
    """Finish the W&B run of this process, if one is open: its files are complete afterwards, and a
    ``WandbLogger`` created later in the same process cannot log into it (notebooks, tests, multi-stage runs)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def finish_runs(loggers: Iterable[Logger]) -> None:
    """Finish the W&B run when ``loggers`` hold a ``WandbLogger`` (see :func:`finish_open_run`)."""
    if wandb_loggers(loggers):
        finish_open_run(exit_code=0)


def stage_run_settings(init_args: Any, base_name: str, stage: str, run_id: str) -> None:
    """Point the ``init_args`` of a ``WandbLogger`` config at one stage of a multi-stage run: name
    ``<base>-<stage>``, group ``<base>`` (unless set), job type ``<stage>``, a fixed id with ``resume="allow"``, so
    an interrupted stage continues its own W&B run. ``init_args`` is a dict or namespace, edited in place."""
    get = init_args.get if hasattr(init_args, "get") else lambda k, d=None: getattr(init_args, k, d)
    base = get("name") or base_name
    values = {"name": f"{base}-{stage}", "group": get("group") or base, "job_type": stage, "id": run_id,
              "resume": "allow"}
    for key, value in values.items():
        init_args[key] = value
