"""ResultsWriter: every ``fit`` / ``validate`` / ``test`` leaves ``results.json`` and ``metrics.csv`` in its run
directory, and the W&B summary keeps the best validation values as well as the last.

What the record holds is described in :mod:`lightning_methods.results.record` (run id, config path and hash, versions,
device, seed, epochs, wall time, best and last validation metrics with their epochs, test metrics with the checkpoint
they were computed from, checkpoint paths). The epoch history is part of the callback's checkpoint state, so a resumed
fit writes the whole history, and its wall time adds up over the pieces of the run.

Files are written on rank zero (never under ``fast_dev_run``), atomically, at the end of every training epoch
(``"status": "running"``), at the end of the command (``"finished"``) and when it fails (``"failed"``, with the error;
``"interrupted"`` for Ctrl-C / SIGINT and SIGTERM).
A ``validate`` / ``test`` command run in a directory that already holds a record (a fit's, or an evaluation of another
checkpoint) writes ``results_<command>-<checkpoint>.json`` and ``metrics_<command>-<checkpoint>.csv`` instead
(:func:`checkpoint_tag`: ``results_test-last.json``, ``results_test-best-011.json``), so no record is ever overwritten
by another one, and prints where it wrote.

A resumed fit keeps the run's identity: ``started`` and the config files it was started with (``config_path``) are
taken from the run's ``results.json`` when the resume names the run's own ``config.yaml``, and ``config_hash`` leaves
out what only says where a run resumes from (``ckpt_path``, the logger's run id), so a resumed run groups with its
identical runs in ``lightning-methods table``.

A ``CSVLogger`` that logs into the run directory keeps its per-step files in ``<run dir>/csv/`` (its ``metrics.csv``
and this callback's would otherwise be one file).

The CLI adds this callback to every command (``--results.*`` options) and hands it the resolved config; in your own
Trainer add ``ResultsWriter()`` to ``callbacks``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_methods.results.record import (
    FORMAT,
    best_and_last,
    config_hash,
    device_info,
    flat_metrics,
    metrics_csv_text,
    read_metrics_csv,
    read_record,
    run_directory,
    scalar_metrics,
    versions,
)
from lightning_methods.runs import ConfigMismatchError, RunLockedError
from lightning_methods.utils import atomic_write_json, atomic_write_text, sha256_file
from lightning_methods.utils.wandb import plain


class ResultsWriter(Callback):
    """Write ``results.json`` and ``metrics.csv`` for every fit / validate / test (see the module docstring).

    Args:
        dirpath: where to write; default: the run directory (the parent of the run's ``checkpoints/``, see
            :func:`lightning_methods.results.record.run_directory`).
        monitor: metric that decides the best epoch; default: the monitor of the Trainer's ModelCheckpoint, else
            ``val/acc``.
        mode: ``"max"`` or ``"min"`` for ``monitor``; default: the ModelCheckpoint's, else ``"min"`` for a loss and
            ``"max"`` otherwise.

    Raises:
        ValueError: another ``mode``.
        wandb_summary: declare the validation metrics to W&B with ``define_metric`` (summary ``max,last`` for
            accuracies, ``min,last`` for losses) and write the flat metrics of the record into the run summary.
        info: free-form values recorded under ``"info"`` (the grid runner records the grid, source config,
            overrides and seed there).

    Example::

        Trainer(callbacks=[ResultsWriter()]).fit(model, data)  # -> <run dir>/results.json, <run dir>/metrics.csv
    """

    def __init__(self, dirpath: str | None = None, monitor: str | None = None, mode: str | None = None,
                 wandb_summary: bool = True, info: dict[str, Any] | None = None) -> None:
        if mode not in (None, "max", "min"):
            raise ValueError(f"ResultsWriter mode must be 'max' or 'min', got {mode!r}")
        self.dirpath, self.monitor, self.mode = dirpath, monitor, mode
        self.wandb_summary, self.info = wandb_summary, dict(info or {})
        self.history: list[dict[str, Any]] = []
        self.previous_seconds = 0.0  # wall time of earlier pieces of a resumed fit
        self.run_config: dict[str, Any] | None = None
        self.config_files: list[str] = []
        self.command: str | None = None
        self._record: dict[str, Any] = {}
        self._snapshot: dict[str, float] | None = None
        self._fit_checkpoints: dict[str, Any] | None = None  # the checkpoint paths at the end of fit
        self._late: set[str] = set()  # metrics the LightningModule logs in its own on_train_epoch_end (after ours)
        self._stage: str | None = None
        self._started = time.perf_counter()
        self._dir: Path | None = None
        self._filename = "results.json"

    # ----------------------------------------------------------------------------------------- set up
    def set_run_config(self, config: dict[str, Any] | None, config_files: list[str], command: str | None) -> None:
        """Record the resolved config and the config files of the command (called by the CLI)."""
        self.run_config, self.config_files, self.command = config, list(config_files), command

    @property
    def state_key(self) -> str:
        return "ResultsWriter"

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "seconds": self.previous_seconds + self._elapsed(),
                "late_keys": sorted(self._late)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage != "fit":
            return  # evaluating a checkpoint (test after fit, validate/test): keep this command's own record
        self.history = list(state_dict.get("history", []))
        self.previous_seconds = float(state_dict.get("seconds", 0.0))
        self._late = set(state_dict.get("late_keys", []))

    def _elapsed(self) -> float:
        return time.perf_counter() - self._started

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        self._stage = stage
        if self.command is None:
            self.command = stage
        if not self._record:
            self._started = time.perf_counter()
            self._record = {"format": FORMAT, "command": self.command, "status": "running",
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._separate_csv_logger(trainer)

    def _separate_csv_logger(self, trainer: Trainer) -> None:
        """A ``CSVLogger`` writing into this run directory gets the subfolder ``csv/``: its ``metrics.csv`` (one row
        per logging step) and this callback's (one row per epoch) would be one file and break each other."""
        target = (Path(self.dirpath) if self.dirpath else run_directory(trainer)).absolute()
        for logger in trainer.loggers:
            if type(logger) is CSVLogger and Path(logger.log_dir).absolute() == target:
                logger.__class__ = _CSVLoggerInSubfolder
                writer = logger.experiment  # created before the callbacks' setup: point it at the subfolder too
                if trainer.is_global_zero and Path(getattr(writer, "log_dir", "")).absolute() == target:
                    writer.log_dir = logger.log_dir
                    writer.metrics_file_path = os.path.join(writer.log_dir, writer.NAME_METRICS_FILE)
                    os.makedirs(writer.log_dir, exist_ok=True)

    def _monitor(self, trainer: Trainer) -> tuple[str, str]:
        ckpt = trainer.checkpoint_callback
        monitor = self.monitor or getattr(ckpt, "monitor", None) or "val/acc"
        mode = self.mode or (getattr(ckpt, "mode", None) if getattr(ckpt, "monitor", None) == monitor else None)
        return monitor, mode or ("min" if "loss" in monitor else "max")

    # ----------------------------------------------------------------------------------------- fit
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_checkpoints = None
        self._record["resumed_from"] = str(trainer.ckpt_path) if trainer.ckpt_path else None
        if trainer.ckpt_path and trainer.is_global_zero:
            self._fill_from_file(trainer)
            self._keep_identity(trainer)
        if self.wandb_summary and trainer.is_global_zero:
            monitor, mode = self._monitor(trainer)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    define_wandb_metrics(logger.experiment, monitor, mode)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: v for k, v in scalar_metrics(trainer.callback_metrics).items() if k.startswith("val")}
        if trainer.state.fn == "validate":
            self._record["validate"] = {"checkpoint": _ckpt(trainer), "metrics": metrics}
            self._finish(trainer, "finished")
            return
        # the row is started here: ModelCheckpoint saves right after this hook, and its state must hold the epoch
        self._row(trainer).update(metrics)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._snapshot = scalar_metrics(trainer.callback_metrics)
        # values the module logs after this hook (train/lr) still hold the previous epoch's here: added later
        self._row(trainer).update({k: v for k, v in self._snapshot.items()
                                   if not k.startswith(("val", "test")) and k not in self._late})
        self._write(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._complete_row(trainer):
            self._write(trainer)  # so that metrics.csv is complete for a resume after a kill in this epoch

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._complete_row(trainer)

    def _fill_from_file(self, trainer: Trainer) -> None:
        """A checkpoint written at validation end holds its epoch's row without the training metrics (they are
        reduced later in the epoch): take them from the run's own ``metrics.csv`` (same epoch and step)."""
        path = self._run_dir(trainer) / "metrics.csv"
        if not path.is_file():
            return
        try:
            rows = {(r.get("epoch"), r.get("step")): r for r in read_metrics_csv(path)}
        except (OSError, ValueError, csv.Error):
            return
        for row in self.history:
            for key, value in rows.get((row["epoch"], row.get("step")), {}).items():
                row.setdefault(key, value)

    def _keep_identity(self, trainer: Trainer) -> None:
        """A resume keeps the run's start time and, when it names the run's own ``config.yaml``, the config files the
        run was started with (so ``table`` names and groups it as before)."""
        run_dir = self._run_dir(trainer)
        old = read_record(run_dir / "results.json") if (run_dir / "results.json").is_file() else None
        if not old or old.get("command") != "fit":
            return
        if old.get("started"):
            self._record["started"] = old["started"]
        own = (run_dir / "config.yaml").absolute()
        old_files = [f.get("path") for f in old.get("config_files") or [] if isinstance(f, dict) and f.get("path")]
        if old_files and self.config_files and Path(self.config_files[-1]).absolute() == own:
            self.config_files = old_files

    def _row(self, trainer: Trainer) -> dict[str, Any]:
        """The history row of the current epoch (created on first use); epoch, step, time and lr kept current."""
        epoch = trainer.current_epoch
        if not self.history or self.history[-1]["epoch"] != epoch:
            self.history = [r for r in self.history if r["epoch"] < epoch] + [{"epoch": epoch}]
        row = self.history[-1]
        row.update({"step": trainer.global_step, "time_s": round(self.previous_seconds + self._elapsed(), 3)})
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        return row

    def _complete_row(self, trainer: Trainer) -> bool:
        """Add what the LightningModule logged in its own ``on_train_epoch_end`` (it runs after the callbacks'):
        values that appeared or changed since the row was written, and those known to be logged there. Returns
        whether the row changed."""
        if self._snapshot is None or not self.history:
            return False
        new = {k: v for k, v in scalar_metrics(trainer.callback_metrics).items()
               if not k.startswith(("val", "test")) and (self._snapshot.get(k) != v or k in self._late)}
        self._late |= {k for k, v in new.items() if self._snapshot.get(k) != v}
        self._snapshot = None
        self.history[-1].update(new)
        return bool(new)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # kept for the record: testing a checkpoint after fit (test_after_fit: best) restores the ModelCheckpoint's
        # state from that checkpoint, which names no last.ckpt when it was written before the first one
        self._fit_checkpoints = _checkpoint_paths(trainer)
        self._finish(trainer, "interrupted" if trainer.interrupted else "finished")

    # ----------------------------------------------------------------------------------------- test
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {k: v for k, v in scalar_metrics(trainer.callback_metrics).items() if k.startswith("test")}
        self._record["test"] = {"checkpoint": _ckpt(trainer), "metrics": metrics}
        self._finish(trainer, "finished")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (RunLockedError, ConfigMismatchError)):
            return  # the run directory belongs to another process or config: its record is not ours to write
        self._record["error"] = f"{type(exception).__name__}: {exception}"
        # Ctrl-C / SIGINT raise KeyboardInterrupt; Lightning turns SIGTERM into SIGTERMException (a SystemExit)
        interrupted = isinstance(exception, (KeyboardInterrupt, SystemExit))
        self._finish(trainer, "interrupted" if interrupted else "failed")

    # ----------------------------------------------------------------------------------------- writing
    def _finish(self, trainer: Trainer, status: str) -> None:
        self._record["status"] = status
        self._record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        record = self._write(trainer)
        if record is not None and self.command in ("validate", "test") and status == "finished":
            print(f"[lightning-methods] {self.command} results: {self._dir / self._filename}", flush=True)
        if self.wandb_summary and record is not None and record["metrics"]:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update(record["metrics"])

    def record(self, trainer: Trainer) -> dict[str, Any]:
        """The current record (what ``results.json`` holds)."""
        monitor, mode = self._monitor(trainer)
        best, last = best_and_last(self.history, monitor, mode)
        config = self.run_config
        rec = dict(self._record)
        rec.update({
            "run_id": _run_id(trainer), "run_dir": str(self._run_dir(trainer)),
            "config_path": self.config_files[-1] if self.config_files else None,
            "config_files": [{"path": p, "sha256": sha256_file(p) if os.path.isfile(p) else None}
                             for p in self.config_files],
            "config_hash": config_hash(identity_config(config)) if config is not None else None, "config": config,
            "seed": _seed(config), "versions": versions(), "device": device_info(trainer),
            "epochs_completed": self.history[-1]["epoch"] + 1 if self.history else None,
            "global_step": trainer.global_step,
            "max_epochs": trainer.max_epochs, "wall_time_s": round(self.previous_seconds + self._elapsed(), 3),
            "monitor": monitor, "mode": mode, "best": best, "last": last,
            "checkpoints": self._fit_checkpoints or _checkpoint_paths(trainer),
            "model_hparams": plain(dict(trainer.lightning_module.hparams)) if trainer.lightning_module else None,
            "info": self.info,
        })
        rec["metrics"] = flat_metrics(rec)
        return rec

    def _run_dir(self, trainer: Trainer) -> Path:
        if self._dir is None:
            self._dir = Path(self.dirpath) if self.dirpath else run_directory(trainer)
            if self.command in ("validate", "test"):
                self._filename = self._eval_filename(trainer)
        return self._dir

    def record_file(self, trainer: Trainer) -> Path:
        """The file this evaluation's (or fit's) record goes to: ``results.json``, or ``results_test-last.json`` and
        the like beside another record (files that belong to one evaluation carry the same tag)."""
        return self._run_dir(trainer) / self._filename

    def _eval_filename(self, trainer: Trainer) -> str:
        """``results.json`` in a directory without a record (or holding this very evaluation), else
        ``results_<command>-<checkpoint tag>.json``: never another record's file."""
        existing = self._dir / "results.json"
        if not existing.is_file():
            return "results.json"
        other = read_record(existing)
        if other is not None and other.get("command") == self.command \
                and (other.get(self.command) or {}).get("checkpoint") == _ckpt(trainer):
            return "results.json"
        tag = f"-{checkpoint_tag(trainer.ckpt_path, self._dir)}" if trainer.ckpt_path else ""
        return f"results_{self.command}{tag}.json"

    def _write(self, trainer: Trainer) -> dict[str, Any] | None:
        """Write the record and the metrics CSV (rank zero; returns the record there, ``None`` elsewhere)."""
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return None  # fast_dev_run is a smoke test: like checkpoints, no result files
        record = self.record(trainer)
        run_dir = self._run_dir(trainer)
        atomic_write_json(run_dir / self._filename, record)
        csv_name = "metrics.csv" if self._filename == "results.json" else self._filename.replace("results", "metrics")
        rows = self.history if self.command == "fit" else [self._eval_row(record)]
        atomic_write_text(run_dir / csv_name.replace(".json", ".csv"), metrics_csv_text(rows))
        return record

    @staticmethod
    def _eval_row(record: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"step": record["global_step"]}
        for part in ("validate", "test"):
            row.update((record.get(part) or {}).get("metrics", {}))
        return row


class _CSVLoggerInSubfolder(CSVLogger):
    """A ``CSVLogger`` whose files (``metrics.csv``, ``hparams.yaml``) go to ``<its directory>/csv/``; checkpoints and
    the run directory stay where they were."""

    @property
    def log_dir(self) -> str:
        return os.path.join(super().log_dir, "csv")


def identity_config(config: Any) -> Any:
    """``config`` without what only says where a run resumes from (``ckpt_path``, the logger's run ``id`` /
    ``version``, set to ``None``): the config a run keeps over all its pieces, whose hash is ``config_hash``."""
    if not isinstance(config, dict):
        return config
    out = json.loads(json.dumps(config, default=str))
    if "ckpt_path" in out:
        out["ckpt_path"] = None
    loggers = (out.get("trainer") or {}).get("logger") if isinstance(out.get("trainer"), dict) else None
    for entry in loggers if isinstance(loggers, list) else [loggers]:
        args = entry.get("init_args") if isinstance(entry, dict) else None
        if isinstance(args, dict):
            for key in ("id", "version"):
                if key in args:
                    args[key] = None
    return out


def checkpoint_tag(ckpt_path: Any, run_dir: str | Path) -> str:
    """A file-name tag for the checkpoint an evaluation used: its stem (``last``, ``best-011``), plus a short hash of
    its path when it lies outside ``<run_dir>/checkpoints`` (two files of one name never share a record)."""
    path = Path(str(ckpt_path)).expanduser().absolute()
    tag = path.stem
    if path.parent != Path(run_dir).absolute() / "checkpoints":
        tag += "-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return tag


def define_wandb_metrics(run: Any, monitor: str, mode: str) -> None:
    """Declare the validation metrics to a W&B run so its summary keeps the best value as well as the last:
    ``monitor`` with ``mode,last``; ``val/*acc*`` with ``max,last``; ``val/*loss*`` with ``min,last``. Charts keep
    Lightning's x axis (``trainer/global_step``)."""
    names = {monitor: mode, "val/acc": "max", "val/acc_top5": "max", "val/loss": "min"}
    for name, how in names.items():
        run.define_metric(name, step_metric="trainer/global_step", summary=f"{how},last")


def _ckpt(trainer: Trainer) -> str | None:
    """The checkpoint an evaluation used (``None``: the weights in memory, e.g. the final weights of a fit)."""
    return str(Path(trainer.ckpt_path).resolve()) if trainer.ckpt_path else None


def _run_id(trainer: Trainer) -> str | None:
    for logger in trainer.loggers:
        version = logger.version
        if version is not None:
            return version if isinstance(version, str) else f"version_{version}"
    return None


def _seed(config: dict[str, Any] | None) -> Any:
    if config is not None and "seed_everything" in config:
        return config["seed_everything"]
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None and seed.lstrip("-").isdigit() else None


def _checkpoint_paths(trainer: Trainer) -> dict[str, Any]:
    """The best and last checkpoint paths and the best score of the Trainer's ModelCheckpoint (``None`` where none)."""
    ckpt = trainer.checkpoint_callback
    return {"best": getattr(ckpt, "best_model_path", None) or None,
            "last": getattr(ckpt, "last_model_path", None) or None,
            "best_score": _score(getattr(ckpt, "best_model_score", None))}


def _score(value: Any) -> float | None:
    return None if value is None else float(value.item() if hasattr(value, "item") else value)
