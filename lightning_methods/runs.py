"""Run plumbing for multi-stage procedures (selection rounds, federated rounds, OOD pipeline stages, grids).

A :class:`StagedRun` is one run directory::

    run_dir/
      state.json     kind, fingerprint of every setting that changes results, finished stages and their records,
                     the W&B run id of every stage
      config.yaml    the resolved config of the run (written once, by the command that created it)
      .lock          pid and host of the process working in the directory
      <stage>/       each stage's files (checkpoints, results)

Rules it enforces (so a run never mixes two experiments and never redoes finished work):

- **Fingerprint.** The run is created with the fingerprint of its config; a later command on the same directory
  must present the same fingerprint, or it stops with :class:`ConfigMismatchError` naming the fields that differ.
  :func:`config_fingerprint` keeps every setting except those that cannot change results (paths to data, worker
  counts, logging and progress display); trainer settings (``max_epochs``, ``precision``, ``devices``, ...) count.
- **Finished stages** are recorded with :meth:`StagedRun.mark_done` only after all their files are written, and are
  never recomputed; a stage that was interrupted (or cut short) is not recorded and resumes from its own files.
- **One process at a time.** :meth:`StagedRun.open` takes ``.lock`` (rank zero only); a second command on the same
  directory stops with :class:`RunLockedError`; a lock left by a dead process on this host is detected and replaced.
- **Crash-safe writes** (temporary file + rename) for the state and every file written through the run; rank zero
  writes, other ranks only read.
- **W&B**: every stage gets its own W&B run (name ``<run>-<stage>``, group ``<run>``) with a fixed id, so an
  interrupted stage continues its own W&B run (:meth:`StagedRun.stage_logger_settings`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_methods.utils.distributed import broadcast_object, get_rank
from lightning_methods.utils.io import atomic_save_numpy, atomic_torch_save, atomic_write_json, atomic_write_text
from lightning_methods.utils.wandb import plain, stage_run_settings

#: Config keys (leaf names) that never change results: where data lives, how it is loaded, how progress is shown.
#: ``devices`` and ``num_nodes`` are not among them: their product is the world size, which sets the global batch.
NEUTRAL_KEYS = frozenset({
    "data_dir", "download", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "label_file",
    "logger", "enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir",
    "accelerator", "profiler", "barebones", "detect_anomaly", "enable_checkpointing",
})


class ConfigMismatchError(ValueError):
    """The run directory holds a run made with different settings."""


class RunLockedError(RuntimeError):
    """Another live process works in the run directory."""


def new_wandb_id() -> str:
    """A fresh W&B run id: a letter, then 11 hex digits. W&B's own ids (8 base-36 characters) may be digits and one
    ``e`` (``12345e67``, about one in 47,000), which jsonargparse reads back from a ``config.yaml`` or the command line
    as a float (1.2345e+71, quoted or not), so the run could not be resumed; an id that starts with a letter cannot."""
    return "r" + uuid.uuid4().hex[:11]


def config_fingerprint(config: Any, neutral: Iterable[str] = NEUTRAL_KEYS) -> dict[str, Any]:
    """The settings of ``config`` (namespace or mapping) that change results: a JSON-safe nested dict without the
    keys named in ``neutral`` (leaf names, at any depth)."""
    skip = set(neutral)

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in skip}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(plain(config))


_ABSENT = object()
#: whose parameters a ``trainer`` section of a config holds (LightningCLI's ``trainer``, the stage commands' too)
TRAINER_CLASS = "lightning.pytorch.Trainer"


def parameter_default(class_path: str, name: str) -> Any:
    """The default of parameter ``name`` of the class (or function) ``class_path``, following ``**kwargs`` into the
    base classes as jsonargparse does; ``_ABSENT`` when it cannot be found (no such class or parameter, no default)."""
    module, _, attr = class_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return _ABSENT
    for owner in target.__mro__ if isinstance(target, type) else (target,):
        try:
            params = inspect.signature(owner.__init__ if isinstance(target, type) else owner).parameters
        except (TypeError, ValueError):
            return _ABSENT
        if name in params:
            default = params[name].default
            return _ABSENT if default is inspect.Parameter.empty else default
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return _ABSENT
    return _ABSENT


def class_path_of(cls: type) -> str:
    """``module.Class`` of a class, as a config's ``class_path`` names it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def fingerprint_diff(old: Any, new: Any, prefix: str = "", owner: str | None = None,
                     sections: Mapping[str, type | str] | None = None) -> list[str]:
    """Dotted names of the fields where two fingerprints differ (``["trainer.max_epochs", ...]``).

    A field that ``old`` (the recorded run) lacks is no difference when ``new`` holds its parameter's default: a
    setting that a later version of the package, Lightning or torch added, whose default keeps what the earlier
    version did, so upgrading does not make a run unresumable. The parameter is looked up in the signature of the
    class named beside it (``class_path`` / ``init_args``), or of the class whose arguments a section holds
    (``sections``: section name -> class, for a command's ``parser.add_class_arguments(Config, "name")``; a
    ``trainer`` section is always Lightning's Trainer); any other added, removed or changed field is a difference."""
    known = {"trainer": TRAINER_CLASS, **{k: v if isinstance(v, str) else class_path_of(v)
                                          for k, v in (sections or {}).items()}}
    return _diff(old, new, prefix, owner, known)


def _diff(old: Any, new: Any, prefix: str, owner: str | None, sections: Mapping[str, str]) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            was, now = old.get(key, _ABSENT), new.get(key, _ABSENT)
            if was is _ABSENT or now is _ABSENT:
                default = parameter_default(owner, str(key)) if owner is not None and was is _ABSENT else _ABSENT
                if default is _ABSENT or plain(default) != now:
                    out.append(f"{prefix}{key}")
                continue
            inner = None
            if key == "init_args" and isinstance(new.get("class_path"), str):
                inner = new["class_path"]
            elif key in sections and isinstance(now, dict) and "class_path" not in now:
                inner = sections[str(key)]
            out += _diff(was, now, f"{prefix}{key}.", inner, sections)
        return out
    return [] if old == new else [prefix.rstrip(".") or "<root>"]


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs: a zombie (killed, not yet reaped by its parent, which takes a
    moment after ``kill -9`` under ``timeout`` or a scheduler) counts as dead, so a rerun started at once takes over."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the signal test decides
    return stat.rpartition(")")[2].split()[:1] != ["Z"]  # the state follows the command name in parentheses


class RunLock:
    """An exclusive lock on a run directory: the file ``<run_dir>/<name>`` holds the pid and host of the process that
    works there. A second process stops with :class:`RunLockedError` naming the holder; a lock left by a dead process
    on this host is detected and replaced. Used by :class:`StagedRun` (``.lock``) and by ``lightning-methods fit``
    (``.fit.lock``, :mod:`lightning_methods.cli_runs`).

    Args:
        run_dir: the directory.
        name: the lock file's name.
        what: how the message names the run ("run directory", "fit run directory", ...).
    """

    def __init__(self, run_dir: str | Path, name: str = ".lock", what: str = "run directory") -> None:
        self.path, self.what, self.locked = Path(run_dir) / name, what, False

    @staticmethod
    def holder(path: str | Path) -> dict[str, Any]:
        """``{"pid", "host"}`` recorded in a lock file (``{}`` when unreadable)."""
        try:
            holder = json.loads(Path(path).read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> RunLock:
        """Take the lock (raises :class:`RunLockedError` while another live process holds it)."""
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self.holder(self.path)
                pid, host = holder.get("pid"), holder.get("host")
                if not holder:  # just created by another process, which writes its pid next: look again
                    time.sleep(0.05)
                    continue
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    self._remove_stale(holder)  # a dead process's lock on this host
                    continue
                raise RunLockedError(
                    f"{self.path.parent} ({self.what}) is in use by process {pid} on {host} (lock file {self.path}). "
                    "Wait for it to finish or choose another run directory; if that process no longer exists, "
                    "delete the lock file."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.locked = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}: it stays empty or unreadable (a process killed "
                             "while taking it?). If no process works in this run directory, delete the lock file.")

    def _remove_stale(self, holder: dict[str, Any]) -> None:
        """Delete the lock file if it still holds ``holder`` (a dead process), one process at a time: two processes
        that both read the same stale lock would otherwise both take the lock, the second deleting the fresh lock of
        the first. The deletion is guarded by ``<lock>.break`` (taken with ``O_EXCL``; one left by a process that
        died holding it is removed after 10 s); while another process holds it, wait a moment and look again."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > 10:
                    guard.unlink(missing_ok=True)
            time.sleep(0.05)
            return
        try:
            if self.holder(self.path) == holder:  # not yet replaced by another process
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Release the lock (if this object holds it)."""
        if self.locked:
            self.path.unlink(missing_ok=True)
            self.locked = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class StagedRun:
    """A run directory of a multi-stage procedure (see the module docstring).

    Args:
        run_dir: the directory (created if needed).
        kind: what the run is (``"early_cutting"``, ``"fedfree"``, ``"ood"``, ...); a directory of another kind is
            refused.
        fingerprint: the settings that change results (see :func:`config_fingerprint`).
        resume: continue a run found in ``run_dir``; ``False`` refuses an existing run instead.
        config_text: the resolved config, written to ``run_dir/config.yaml`` when the run is created.
        sections: the config classes whose arguments the fingerprint's sections hold (``{"selection":
            SelectionConfig}``), so a setting a later version added to one keeps the run resumable at its default
            (:func:`fingerprint_diff`).

    Use it as a context manager (or call :meth:`open` / :meth:`close`)::

        with StagedRun(run_dir, "fedfree", config_fingerprint(cfg), config_text=parser.dump(cfg)) as run:
            for r in range(rounds):
                if run.is_done(f"round{r}"):
                    continue
                ...  # train, write files with run.write_json / run.save_torch
                run.mark_done(f"round{r}", {"acc": acc})
    """

    def __init__(self, run_dir: str | Path, kind: str, fingerprint: Mapping[str, Any], resume: bool = True,
                 config_text: str | None = None, sections: Mapping[str, type | str] | None = None) -> None:
        self.run_dir = Path(run_dir).expanduser()
        self.kind, self.fingerprint, self.resume = kind, plain(dict(fingerprint)), resume
        self.sections = dict(sections or {})  # section -> config class, for settings added by a later version
        self.config_text = config_text
        self.state: dict[str, Any] = {}
        self._lock_file = RunLock(self.run_dir)

    # ------------------------------------------------------------------------------------------- lifecycle
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def is_writer(self) -> bool:
        """True on the process that writes files (rank zero)."""
        return get_rank() == 0

    def open(self) -> StagedRun:
        """Lock the directory, then load (checking kind and fingerprint) or create the state. Rank zero decides; a
        refusal (lock held, other settings, another kind) travels in the same broadcast as the state, so every rank
        raises it and none is left waiting."""
        state, refusal, error = None, None, None
        if self.is_writer:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._lock()
                state = self._load_or_create()
            except Exception as err:
                self.close()
                refusal, error = (type(err), str(err)), err
        try:
            state, refusal = broadcast_object((state, refusal))
        except BaseException:
            self.close()
            raise
        if refusal is not None:
            if error is not None:
                raise error
            try:
                same = refusal[0](refusal[1])
            except TypeError:  # an exception class that takes other arguments
                same = RuntimeError(f"{refusal[0].__name__}: {refusal[1]}")
            raise same
        self.state = state
        return self

    def _load_or_create(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            state = {"kind": self.kind, "fingerprint": self.fingerprint, "stages": {}, "wandb_ids": {},
                     "created": time.strftime("%Y-%m-%d %H:%M:%S")}
            if self.config_text is not None:
                atomic_write_text(self.run_dir / "config.yaml", self.config_text)
            atomic_write_json(self.state_path, state)
            return state
        if not self.resume:
            raise FileExistsError(f"{self.run_dir} already holds a {self.kind} run; pass --resume true to continue "
                                  "it, or choose another run directory")
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.state_path} is not valid JSON ({err}); restore it from a backup or choose "
                             "another run directory") from err
        if state.get("kind") != self.kind:
            raise ConfigMismatchError(f"{self.run_dir} holds a {state.get('kind')!r} run, not a {self.kind!r} run; "
                                      "choose another run directory")
        diff = fingerprint_diff(state.get("fingerprint", {}), self.fingerprint, sections=self.sections)
        if diff:
            shown = ", ".join(diff[:12]) + (f" (and {len(diff) - 12} more)" if len(diff) > 12 else "")
            raise ConfigMismatchError(
                f"{self.run_dir} holds a run made with other settings; they differ in: {shown}. Rerun with the "
                f"settings recorded in {self.run_dir / 'config.yaml'} to resume it, or choose another run directory "
                "for the new settings (a run never mixes two experiments)."
            )
        state.setdefault("stages", {})
        state.setdefault("wandb_ids", {})
        return state

    def _lock(self) -> None:
        self._lock_file.acquire()

    def close(self) -> None:
        """Release the lock."""
        self._lock_file.release()

    def __enter__(self) -> StagedRun:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- stages
    def is_done(self, stage: str) -> bool:
        return stage in self.state.get("stages", {})

    def record(self, stage: str) -> dict[str, Any] | None:
        """The record of a finished stage (``None`` if it has not finished)."""
        return self.state.get("stages", {}).get(stage)

    def mark_done(self, stage: str, record: Mapping[str, Any] | None = None) -> None:
        """Record ``stage`` as finished (call only after all its files are written)."""
        self.state.setdefault("stages", {})[stage] = plain(dict(record or {}))
        self.save_state()

    def set(self, key: str, value: Any) -> None:
        """Store a run-level value in the state (e.g. a seed stream position) and save."""
        self.state[key] = plain(value)
        self.save_state()

    def save_state(self) -> None:
        if self.is_writer:
            atomic_write_json(self.state_path, self.state)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    # ------------------------------------------------------------------------------------------- files
    def write_json(self, relpath: str, data: Any) -> Path:
        path = self.run_dir / relpath
        if self.is_writer:
            atomic_write_json(path, data)
        return path

    def save_torch(self, relpath: str, obj: Any) -> Path:
        path = self.run_dir / relpath
        if self.is_writer:
            atomic_torch_save(obj, path)
        return path

    def save_numpy(self, relpath: str, array: Any) -> Path:
        path = self.run_dir / relpath
        if self.is_writer:
            atomic_save_numpy(array, path)
        return path

    # ------------------------------------------------------------------------------------------- W&B
    def wandb_id(self, stage: str) -> str:
        """The W&B run id of ``stage`` (created once, kept in the state, :func:`new_wandb_id`)."""
        ids = self.state.setdefault("wandb_ids", {})
        if stage not in ids:
            ids[stage] = broadcast_object(new_wandb_id())
            self.save_state()
        return ids[stage]

    def stage_logger_settings(self, trainer_config: Any, stage: str) -> None:
        """Edit the ``WandbLogger`` entries of a trainer config (namespace or dict, before instantiation) so the
        stage logs into its own W&B run: name ``<name or run dir>-<stage>``, group, job type, fixed id."""
        loggers = trainer_config.get("logger") if hasattr(trainer_config, "get") else None
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            class_path = str(logger.get("class_path", "") if hasattr(logger, "get") else "")
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if class_path.endswith("WandbLogger") and init_args is not None:
                stage_run_settings(init_args, self.run_dir.name, stage, self.wandb_id(stage))
