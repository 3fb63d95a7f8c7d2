"""Weights & Biases helpers shared by the CLI and the multi-stage runners (public W&B / Lightning API only)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Lightning is imported where a logger is used, so light commands (--help, list) stay fast
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
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def log_pictures(pictures: Mapping[str, str | Path | None], loggers: Iterable[Any] = (),
                 settings: Mapping[str, Any] | None = None, step: int | None = None) -> int:
    """Log the PNG files of a command (``{key: path}``; ``None`` paths are skipped) as W&B images: into every
    ``WandbLogger`` (or ``wandb`` run) among ``loggers``, or, when there is none and ``settings`` is given (the
    ``init_args`` of a ``WandbLogger``, e.g. from a config or ``--wandb_*`` options), into a new W&B run with those
    settings that is finished afterwards. Returns how many W&B runs received the pictures (0: none configured)."""
    files = {key: str(path) for key, path in pictures.items() if path is not None and Path(path).is_file()}
    if not files:
        return 0
    loggers = list(loggers)
    targets = [lg.experiment for lg in wandb_loggers(lg for lg in loggers if not _is_run(lg))]
    targets += [run for run in loggers if _is_run(run)]
    created = None
    if not targets and settings is not None:
        from lightning.pytorch.loggers import WandbLogger

        created = WandbLogger(**dict(settings))
        targets = [created.experiment]
    import wandb

    payload: dict[str, Any] = {key: wandb.Image(path) for key, path in files.items()}
    for run in targets:
        run.log(payload if step is None else {**payload, "trainer/global_step": step})
    if created is not None:
        finish_open_run(exit_code=0)
    return len(targets)


def _is_run(obj: Any) -> bool:
    """A ``wandb`` run (it has ``log`` and ``summary``) rather than a Lightning logger."""
    return hasattr(obj, "log") and hasattr(obj, "summary") and not hasattr(obj, "log_metrics")


def log_config(loggers: Iterable[Logger], config: Mapping[str, Any]) -> None:
    """Write ``config`` into the run config of every W&B logger (the resolved config of a run, on rank zero)."""
    for logger in wandb_loggers(loggers):
        logger.experiment.config.update(plain(config), allow_val_change=True)


def finish_open_run(exit_code: int = 0) -> None:
    """Finish the W&B run of this process, if one is open: a ``WandbLogger`` created later in the same process
    cannot log into it (notebooks, tests, multi-stage runs). W&B's service process writes the run's files; some
    releases (0.19.10, 0.24.0) return from ``wandb.finish()`` before an offline run file is written, which
    ``wandb.teardown()`` or the end of the process then completes."""
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
