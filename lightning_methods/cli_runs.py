"""Run bookkeeping of the ``lightning-methods`` CLI (issue 18): every fit has its own directory, config and resume
command, ``--ckpt_path last`` finds the run to resume, and user errors stop early with the package's own message.

- **Config per run.** A fit writes its resolved config to ``<run dir>/config.yaml`` (the run dir is the parent of its
  ``checkpoints/``, e.g. ``runs/quickstart/<project>/<run id>/``), with the run's logger id filled in, so the file
  describes exactly the run beside it and re-running it continues that run. validate / test / predict never write it.
- **Run id and resume command.** Every fit prints its run id, its directory and the exact command that resumes it,
  at the start, at the end and when it fails or is interrupted.
- **``--ckpt_path last``** without a run id (which Lightning answers by silently training from scratch) resumes the
  latest run of the same config found under the logger's directory, and the logger continues that run (W&B id,
  CSV / TensorBoard version). When no run has the same config, or none exists, it stops with a
  :class:`ResumeError` that lists the runs (how they differ, when they last saved) with the exact resume command.
- **weights_only.** ``--weights_only`` defaults to ``True`` for fit / validate / test / predict (Lightning's default
  ``None`` means ``False`` with a warning), so no checkpoint can run code while it loads; ``--weights_only false`` is
  the explicit, warned opt-in. A corrupt checkpoint is reported before anything is built.
- **Manual optimization.** ``--trainer.gradient_clip_val`` and ``--trainer.accumulate_grad_batches`` fail early for
  the package's modules with a pointer to ``--model.init_args.grad_clip_norm``.
- **One fit per run directory, one config per run.** A fit holds ``<run dir>/.fit.lock`` (pid and host, the same
  :class:`~lightning_methods.runs.RunLock` as multi-stage runs; a lock of a dead process is replaced), so the resume
  command started twice stops with :class:`~lightning_methods.runs.RunLockedError` naming the other process. A run
  directory whose ``config.yaml`` has other settings (a reused ``--trainer.logger.init_args.id``, an edited
  ``config.yaml``) is refused with :class:`~lightning_methods.runs.ConfigMismatchError` naming the fields, before
  anything is written; a resume from the run's own checkpoint may change only :data:`EXTENSION_KEYS`
  (``--trainer.max_epochs`` to train longer).
- **A finished run** given to ``fit --ckpt_path`` (``last`` or its file) is not trained or tested again: the command
  says so and what to do, and ends with exit code 0 (:class:`RunFinished`).
- **Evaluating a run's checkpoint.** ``validate`` / ``test`` / ``predict`` with ``--ckpt_path <run>/checkpoints/X.ckpt``
  (or ``last``) write their result files into that run's directory, whatever config is given, log into the run's
  W&B run (same id), and print where the files went.
- **W&B run names and ids.** A fit whose ``WandbLogger`` has no ``name`` is named ``<config stem>-seed<seed>``; one
  without an id gets the package's (:func:`give_wandb_id`: a letter and 11 hex digits) instead of W&B's, which may
  read back as a number (``12345e67``); a config holding such an id stops before parsing with a message that says
  how to continue that run (:func:`check_wandb_ids`).
- **Quiet.** The warnings the package's own calls cause (LightningCLI's "args and command line", W&B's
  "anonymous setting", Lightning's install tips, W&B's "git root does not exist", the checkpoint-directory warning
  of a resume) are not shown (:func:`quiet`, ``lightning_methods.utils.quiet.quiet_wandb``); the package's other
  commands show Lightning's device lines once however many Trainers they build, and no W&B "anonymous setting"
  warning either (``lightning_methods.utils.quiet``).
- **Errors.** :func:`print_package_error` prints the package's own message (found inside jsonargparse's wrapped
  errors and their Namespace dumps) last and framed, after the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from lightning_methods.runs import (
    NEUTRAL_KEYS,
    ConfigMismatchError,
    RunLock,
    config_fingerprint,
    fingerprint_diff,
    new_wandb_id,
)
from lightning_methods.utils.io import atomic_write_text
from lightning_methods.utils.wandb import plain

#: config keys that a resumed run may change: paths, display, checkpointing and evaluation choices
RESUME_NEUTRAL = NEUTRAL_KEYS | {"ckpt_path", "weights_only", "test_after_fit", "checkpoint", "nonfinite_guard",
                                 "results", "predictions", "config", "print_config", "verbose",
                                 "return_predictions"}
#: settings a resume from the run's own checkpoint may change (to train a run longer)
EXTENSION_KEYS = frozenset({"trainer.max_epochs", "trainer.max_steps", "trainer.max_time"})
CONFIG_NAME = "config.yaml"
FIT_LOCK = ".fit.lock"
PREFIX = "[lightning-methods]"


class ResumeError(ValueError):
    """``--ckpt_path last`` found no run of this config to resume."""


class RunFinished(Exception):  # noqa: N818 - not an error: the CLI prints it and ends with exit code 0
    """``fit --ckpt_path`` of a run that has already finished: nothing to train (the message says what to do)."""


# --------------------------------------------------------------------------------------------------- loggers
def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if hasattr(obj, "get"):
        return obj.get(key, default)
    return getattr(obj, key, default)


def logger_entries(config: Any) -> list[Any]:
    """The logger entries (``class_path`` / ``init_args``) of a subcommand config; ``[]`` for none / default."""
    loggers = _get(_get(config, "trainer"), "logger")
    entries = loggers if isinstance(loggers, list) else [loggers]
    return [e for e in entries if _get(e, "class_path")]


def _kind(entry: Any) -> str:
    name = str(_get(entry, "class_path", "")).rsplit(".", 1)[-1]
    return {"WandbLogger": "wandb", "CSVLogger": "version", "TensorBoardLogger": "version"}.get(name, "other")


def runs_root(config: Any) -> tuple[Path, str] | None | bool:
    """``(directory holding one folder per run, the logger's id key)`` for the first logger of ``config``;
    ``None`` when the checkpoint directory does not depend on a run id (no logger, or an explicit dirpath); ``False``
    for loggers whose directory layout is not known here (Lightning resolves ``last`` itself)."""
    if _get(_get(config, "checkpoint"), "dirpath"):
        return None
    entries = logger_entries(config)
    root = Path(_get(_get(config, "trainer"), "default_root_dir") or ".")
    if not entries:
        logger = _get(_get(config, "trainer"), "logger")
        return None if logger is False else (root / "lightning_logs", "")  # Lightning's default logger
    entry = entries[0]
    args = _get(entry, "init_args") or {}
    kind = _kind(entry)
    if kind == "wandb":
        save_dir = Path(_get(args, "save_dir") or _get(args, "dir") or root)
        return save_dir / (_get(args, "project") or "lightning_logs"), "id"
    if kind == "version":
        return Path(_get(args, "save_dir") or root) / (_get(args, "name") or "lightning_logs"), "version"
    return False


def _fixed_checkpoint_dir(config: Any) -> Path:
    dirpath = _get(_get(config, "checkpoint"), "dirpath")
    return Path(dirpath) if dirpath else Path(_get(_get(config, "trainer"), "default_root_dir") or ".") / "checkpoints"


# --------------------------------------------------------------------------------------------------- resume
def resume_command(run_dir: Path, last: Path, cwd: Path | None = None) -> str:
    """The exact shell command that resumes the run in ``run_dir`` from ``last``."""
    cwd = Path.cwd() if cwd is None else cwd
    return (f"cd {shlex.quote(str(cwd))} && lightning-methods fit --config {shlex.quote(str(run_dir / CONFIG_NAME))} "
            f"--ckpt_path {shlex.quote(str(last))}")


def _fingerprint(config: Any) -> dict[str, Any]:
    return config_fingerprint(config, RESUME_NEUTRAL)


def resolve_last_checkpoint(config: Any, dumped: dict[str, Any], ignore: frozenset[str] = frozenset()) -> str | None:
    """For ``--ckpt_path last``: set ``ckpt_path`` (and the logger's run id) of ``config`` to the latest run of the same
    config, and return a line saying so; ``None`` if ``ckpt_path`` is not ``"last"``.

    Args:
        config: the subcommand config (edited in place).
        dumped: the same config as plain YAML data (``yaml.safe_load(parser.dump(config))``), for the comparison
            with the ``config.yaml`` of each run.
        ignore: dotted fields that may differ (an evaluation ignores how long the run trained: :data:`EXTENSION_KEYS`).

    Raises:
        ResumeError: no run of this config (the message lists the runs and how to resume each).
    """
    if _get(config, "ckpt_path") != "last":
        return None
    layout = runs_root(config)
    if layout is False:
        return None
    entries = logger_entries(config)
    fixed_id = layout and entries and _get(_get(entries[0], "init_args"), layout[1])
    if layout is None or fixed_id:
        directory = (layout[0] / str(fixed_id) / "checkpoints") if fixed_id else _fixed_checkpoint_dir(config)
        last = directory / "last.ckpt"
        if not last.is_file():
            raise ResumeError(f"--ckpt_path last: there is no {last}. Give the checkpoint file itself (--ckpt_path "
                              "PATH), or start a new run without --ckpt_path.")
        config["ckpt_path"] = str(last)
        return f"{PREFIX} {'evaluating' if ignore else 'resuming from'} {last}"
    root, key = layout
    runs = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not runs:
        raise ResumeError(f"--ckpt_path last: no run with a last.ckpt under {root} (where this config's runs are "
                          "kept), so there is nothing to resume; start without --ckpt_path, or give the checkpoint "
                          "file (--ckpt_path PATH).")
    wanted = _fingerprint(dumped)
    listing = []
    for last in runs:
        run_dir = last.parent.parent
        saved = run_dir / CONFIG_NAME
        try:
            diff = fingerprint_diff(_fingerprint(yaml.safe_load(saved.read_text())), wanted)
            diff = [d for d in diff if d not in ignore]
        except (OSError, yaml.YAMLError):
            diff = [f"<no readable {CONFIG_NAME}>"]
        if not diff:
            if key:
                config_set_run_id(config, run_dir.name, key)
            config["ckpt_path"] = str(last)
            doing = "evaluating the last checkpoint of run" if ignore else "resuming run"  # ignore: an evaluation
            return f"{PREFIX} --ckpt_path last: {doing} {run_dir.name}, the latest of {len(runs)} run(s) in {root}"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last.stat().st_mtime))
        shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
        listing.append(f"  run {run_dir.name} (last saved {when}; differs in {shown})\n"
                       f"      {resume_command(run_dir, last)}")
    raise ResumeError("--ckpt_path last: no run under " + str(root) + " has this config, so nothing was resumed "
                      "(a run with different settings would mix two experiments). Runs found, newest first, with "
                      "the command that resumes each with its own config (append --trainer.max_epochs N to train one "
                      "longer, the only setting a resume may change):\n" + "\n".join(listing[:10]))


def config_set_run_id(config: Any, run_id: Any, key: str | None = None) -> None:
    """Set the run id of the first logger of ``config`` (``id`` for W&B, ``version`` for CSV / TensorBoard)."""
    entries = logger_entries(config)
    if not entries:
        return
    key = key or {"wandb": "id", "version": "version"}.get(_kind(entries[0]))
    if key:
        entries[0]["init_args"][key] = run_id


def apply_cli_defaults(cli: Any) -> None:
    """Called before the classes are built: ``weights_only`` defaults to ``True``; ``--ckpt_path last`` is resolved."""
    sub = cli.subcommand
    if sub is None:
        return
    config = cli.config[sub]
    if "weights_only" in config and config["weights_only"] is None:
        config["weights_only"] = True
    prepare_wandb(config, sub)
    dumped = None
    if _get(config, "ckpt_path") == "last":
        dumped = yaml.safe_load(cli._parser(sub).dump(config, skip_unset=False))
        line = resolve_last_checkpoint(config, dumped, frozenset() if sub == "fit" else EXTENSION_KEYS)
        if line:
            print(line, flush=True)
    if sub == "fit":
        give_wandb_id(config)
        dumped = dumped or yaml.safe_load(cli._parser(sub).dump(config, skip_unset=False))
        check_finished(config)
        run_dir = planned_run_dir(config)
        if run_dir is not None:
            check_run_config(run_dir, dumped, _get(config, "ckpt_path"), _get(_get(config, "checkpoint"), "dirpath"))
    elif sub in ("validate", "test", "predict"):
        evaluate_beside_run(config, sub)


# --------------------------------------------------------------------------------------------------- run identity
#: where launchers (torchrun, SLURM, Lightning's own, MPI, LSF) give a process its rank before the trainer exists
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "JSM_NAMESPACE_RANK", "PMI_RANK",
                  "OMPI_COMM_WORLD_RANK")


def _wandb_args(config: Any) -> Any:
    """The ``init_args`` of the first logger of ``config`` when it is a ``WandbLogger``, else ``None``."""
    entries = logger_entries(config)
    return _get(entries[0], "init_args") if entries and _kind(entries[0]) == "wandb" else None


def give_wandb_id(config: Any) -> None:
    """A new fit's W&B run gets its id from the package (:func:`~lightning_methods.runs.new_wandb_id`, never read
    back as a number) instead of W&B, on the launcher's rank zero only: the other ranks keep none, as with an id that
    W&B draws when the run starts (rank zero's run directory is broadcast to them). An id given by the user, a
    ``version``, or ``WANDB_RUN_ID`` (set by W&B sweeps) is kept."""
    args = _wandb_args(config)
    if args is None or _get(args, "id") or _get(args, "version") or os.environ.get("WANDB_RUN_ID"):
        return
    if all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES):
        args["id"] = new_wandb_id()


ID_OPTION = "--trainer.logger.init_args.id"


def reads_as_number(text: Any) -> bool:
    """Whether jsonargparse reads the logger id ``text`` as a float and refuses it: digits with an exponent or a dot
    (``12345e67``, ``1.2345e+71``). Ids of digits alone, ``nan``, ``inf`` or ``0x1a2b3c`` come back as the strings
    they are (checked with jsonargparse 4.53)."""
    return bool(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", str(text)) and re.search(r"[.eE]", str(text)))


def _config_wandb_id(path: str) -> Any:
    """The id of the first logger of the YAML config file ``path`` when that logger is a ``WandbLogger``."""
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None  # the parser reports what is wrong with the file
    args = _wandb_args(data) if isinstance(data, dict) else None
    return args.get("id") if isinstance(args, dict) else None


def check_wandb_ids(argv: list[str]) -> None:
    """Stop before parsing when a ``--config`` file or ``--trainer.logger.init_args.id`` gives a W&B id that the
    config parser reads as a number: jsonargparse reads ``12345e67`` as 1.2345e+71, quoted or not, and refuses it
    with a message about union subtypes. New fits get ids that start with a letter (:func:`give_wandb_id`); W&B drew
    such an id for about one fit in 47,000 of earlier versions.

    Raises:
        ValueError: naming the file or option, the id, and the command that continues such a run.
    """
    from lightning_methods.cli import config_files, option_values

    for value in option_values(argv, (ID_OPTION,)):
        if reads_as_number(value):
            raise ValueError(f"{ID_OPTION} {value}: the config parser reads this W&B run id as a number, so it "
                             "cannot be used; choose an id that starts with a letter.")
    for value in config_files(argv):
        run_id = _config_wandb_id(value)
        if run_id is None or not reads_as_number(run_id):
            continue
        config = Path(value).expanduser().absolute()
        if reads_as_number(config.parent.name) and float(config.parent.name) == float(run_id):
            run_id = config.parent.name  # the id as W&B gave it (the file holds what the parser made of it)
        last = config.parent / "checkpoints" / "last.ckpt"
        record = config.parent / "results.json"
        original = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            original = json.loads(record.read_text()).get("config_path")
        given = f"--config {shlex.quote(str(original or '<the config it was started with>'))} --ckpt_path"
        sub = argv[0] if argv and argv[0] in ("validate", "test", "predict") else "fit"
        if not last.is_file():
            how = ""
        elif sub == "fit":
            how = (" To continue its training in a new run (a new W&B run and run directory), run:\n"
                   f"  lightning-methods fit {given} {shlex.quote(str(last))}")
        else:  # an evaluation of a run's checkpoint takes the run's id from its directory (evaluate_beside_run)
            how = (" To evaluate its checkpoint, give the config it was started with (the results go beside the run "
                   f"and into its W&B run):\n  lightning-methods {sub} {given} {shlex.quote(str(last))}")
        raise ValueError(
            f"{value}: its W&B run id {run_id} (trainer.logger.init_args.id) is read by the config parser "
            "(jsonargparse) as a number, quoted or not, so this file cannot be parsed. W&B drew such an id for about "
            "one fit in 47,000 before lightning-methods gave runs ids that start with a letter." + how)


def owner_run_dir(ckpt_path: Any) -> Path | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/<file>.ckpt`` beside ``<run>/config.yaml``
    written by ``lightning-methods fit``), or ``None``."""
    if not ckpt_path or "://" in str(ckpt_path):
        return None
    path = Path(str(ckpt_path)).expanduser().absolute()
    if path.parent.name == "checkpoints" and (path.parent.parent / CONFIG_NAME).is_file():
        return path.parent.parent
    return None


def planned_run_dir(config: Any) -> Path | None:
    """The run directory a fit of ``config`` will use when it is known before anything is built (a fixed logger id,
    or a fixed checkpoint directory); ``None`` for a new run (its id is not known yet)."""
    layout = runs_root(config)
    if layout is False:
        return None
    if layout is None:
        dirpath = _get(_get(config, "checkpoint"), "dirpath")
        if dirpath:
            return Path(dirpath).parent if Path(dirpath).name == "checkpoints" else None
        return Path(_get(_get(config, "trainer"), "default_root_dir") or ".")
    entries = logger_entries(config)
    run_id = entries and _get(_get(entries[0], "init_args"), layout[1])
    if not run_id and run_id != 0:
        return None
    return layout[0] / (str(run_id) if layout[1] != "version" or isinstance(run_id, str) else f"version_{run_id}")


def check_run_config(run_dir: Path, dumped: dict[str, Any], ckpt_path: Any, ckpt_dir: Any = None) -> None:
    """Refuse a fit in ``run_dir`` when the run recorded there (its ``config.yaml``) has other settings: a run directory
    belongs to one configuration. A resume from the run's own checkpoint (in ``<run_dir>/checkpoints`` or the fit's
    explicit checkpoint directory ``ckpt_dir``) may change :data:`EXTENSION_KEYS`.

    Raises:
        ConfigMismatchError: naming the fields that differ and what to do.
    """
    saved = Path(run_dir) / CONFIG_NAME
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        return  # unreadable: the checkpoint's own checks decide
    diff = fingerprint_diff(_fingerprint(old), _fingerprint(dumped))
    # resolved: a path spelled through a symlink (cluster home directories) names the same run
    own_dir = Path(str(ckpt_path)).expanduser().resolve().parent if ckpt_path else None
    resuming = own_dir is not None and (own_dir == Path(run_dir).expanduser().resolve() / "checkpoints"
                                        or (ckpt_dir is not None and own_dir == Path(str(ckpt_dir)).resolve()))
    if resuming:
        diff = [d for d in diff if d not in EXTENSION_KEYS]
    if resuming and diff:  # what the checkpoint's hyperparameters set on resume (LightningCLI copies them into the
        hparams = _checkpoint_hparams(ckpt_path)  # config): values the module derived while training, e.g. HPN's bounds
        diff = [d for d in diff if not _set_by_checkpoint(d, dumped, hparams)]
    if not diff:
        return
    shown = ", ".join(diff[:12]) + (f" (and {len(diff) - 12} more)" if len(diff) > 12 else "")
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    resume = f" Resume it with its own settings: {resume_command(Path(run_dir), last)}." if last.is_file() else ""
    raise ConfigMismatchError(
        f"{Path(run_dir).resolve()} holds a run made with other settings; they differ in: {shown}. A run directory "
        f"belongs to one configuration, so nothing was written.{resume} To run the new settings, start a new run "
        "(leave out --trainer.logger.init_args.id / version, or choose another one; without a logger the run "
        "directory is --trainer.default_root_dir: choose another)."
    )


def _checkpoint_hparams(ckpt_path: Any) -> dict[str, Any]:
    """The ``hyper_parameters`` of a checkpoint, read without loading its tensors into memory (``{}`` if unreadable:
    the checkpoint's own checks report that)."""
    import torch

    try:
        ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file: nothing is taken from it
        return {}
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    return hparams if isinstance(hparams, dict) else {}


_MISSING = object()


def _dig(data: Any, parts: list[str]) -> Any:
    """``data[p0][p1]...`` through nested dicts, or :data:`_MISSING`."""
    for part in parts:
        data = data.get(part, _MISSING) if isinstance(data, dict) else _MISSING
    return data


def _set_by_checkpoint(key: str, dumped: dict[str, Any], hparams: dict[str, Any]) -> bool:
    """Whether the config field ``key`` (``model.init_args.<name>...``) holds the value the checkpoint's
    hyperparameters give it (compared as plain data: tuples as lists)."""
    prefix = "model.init_args."
    if not key.startswith(prefix):
        return False
    new, recorded = _dig(dumped, key.split(".")), _dig(hparams, key[len(prefix):].split("."))
    return new is not _MISSING and recorded is not _MISSING and plain(new) == plain(recorded)


def check_finished(config: Any) -> None:
    """Stop ``fit --ckpt_path`` of a run whose ``results.json`` says it finished all its epochs (it would only be tested
    again and its record rewritten).

    Raises:
        RunFinished: saying where the results are and how to train longer or evaluate again.
    """
    ckpt = _get(config, "ckpt_path")
    run_dir = owner_run_dir(ckpt)
    if run_dir is None:
        return
    from lightning_methods.results.record import read_record

    record = read_record(run_dir / "results.json") if (run_dir / "results.json").is_file() else None
    if not record or record.get("command") != "fit" or record.get("status") != "finished":
        return
    trainer = _get(config, "trainer") or {}
    max_epochs, max_steps = _get(trainer, "max_epochs"), _get(trainer, "max_steps")
    done_epochs, done_steps = record.get("epochs_completed") or 0, record.get("global_step") or 0
    epochs_done = max_epochs not in (None, -1) and done_epochs >= max_epochs
    steps_done = max_steps not in (None, -1) and done_steps >= max_steps
    if not (epochs_done or steps_done):
        return
    limit = f"max_epochs {max_epochs}" if epochs_done else f"max_steps {max_steps}"
    raise RunFinished(
        f"{PREFIX} run {run_dir.name} has already finished ({done_epochs} epochs, {done_steps} steps; {limit}), so "
        f"nothing was trained or tested again. Its results: {run_dir / 'results.json'}.\n"
        f"{PREFIX} to train it longer, add --trainer.max_epochs N (N > {done_epochs}) to the resume command; to "
        f"evaluate it again: lightning-methods test --config {shlex.quote(str(run_dir / CONFIG_NAME))} --ckpt_path "
        f"{shlex.quote(str(ckpt))}"
    )


def evaluate_beside_run(config: Any, sub: str) -> None:
    """``validate`` / ``test`` / ``predict`` of a run's checkpoint: the result files go into that run's directory
    (unless ``--results.dirpath`` / ``--predictions.dirpath`` say otherwise) and a W&B logger of the same project
    logs into the run's W&B run."""
    ckpt = _get(config, "ckpt_path")
    run_dir = owner_run_dir(ckpt)
    if run_dir is None:
        return
    for group in ("results", "predictions"):
        if _get(config, group) is not None and not _get(_get(config, group), "dirpath"):
            config[group]["dirpath"] = str(run_dir)
    layout, entries = runs_root(config), logger_entries(config)
    if layout and entries and _kind(entries[0]) == "wandb" and not _get(_get(entries[0], "init_args"), "id"):
        if Path(layout[0]).resolve() == run_dir.resolve().parent:
            config_set_run_id(config, run_dir.name, "id")  # the evaluation joins the run's W&B run
    print(f"{PREFIX} {sub} of {ckpt} (run {run_dir.name}): result files go to {run_dir}", flush=True)


# --------------------------------------------------------------------------------------------------- W&B, noise
def prepare_wandb(config: Any, sub: str) -> None:
    """W&B logger settings: a fit's run gets a name (``<config stem>-seed<seed>``) unless it has one, and the save
    directory exists before W&B starts (W&B warns "git root ... does not exist" otherwise)."""
    files = _get(config, "config") or []
    stem = Path(str(getattr(files[-1], "relative", files[-1]))).stem if files else None
    seed = _get(config, "seed_everything")
    for entry in logger_entries(config):
        if _kind(entry) != "wandb":
            continue
        args = _get(entry, "init_args")
        if args is None:
            continue
        save_dir = _get(args, "save_dir") or _get(args, "dir")
        if save_dir:
            with contextlib.suppress(OSError):
                Path(save_dir).mkdir(parents=True, exist_ok=True)
        if sub == "fit" and stem and not _get(args, "name"):
            seed_part = f"-seed{seed}" if isinstance(seed, int) and not isinstance(seed, bool) else ""
            args["name"] = f"{stem}{seed_part}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """While a CLI command runs: hide LightningCLI's warning about ``args`` and ``sys.argv`` both being given (the
    package passes ``args`` on purpose) and Lightning's tips (:func:`~lightning_methods.utils.quiet.quiet_trainers`)."""
    from lightning_methods.utils.quiet import quiet_trainers

    with warnings.catch_warnings(), quiet_trainers():
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended")
        yield


def parse_ckpt_path_safely(cli: Any, parse: Any) -> None:
    """Run LightningCLI's ``_parse_ckpt_path`` (``parse``, which reads the hyperparameters of ``--ckpt_path``) after
    verifying the file's recorded checksum, turning a corrupt or code-carrying file into a clear error."""
    import pickle

    from lightning_methods.checkpoint_io import (
        CorruptCheckpointError,
        corrupt_message,
        verify_checksum,
        verify_embedded_digest,
    )

    sub = cli.config.get("subcommand")
    path = cli.config[sub].get("ckpt_path") if sub else None
    if path and Path(path).is_file() and not verify_checksum(path):  # raises CorruptCheckpointError naming the
        verify_embedded_digest(path)  # previous good checkpoint; a copy without .sha256: the digest inside it
    try:
        parse()
    except pickle.UnpicklingError as err:
        if cli.config[sub].get("weights_only") is False:
            return  # explicit opt-in: the Trainer loads it (with a warning); no hyperparameters are read here
        raise ValueError(
            f"checkpoint {path} holds objects that a weights-only load refuses ({str(err).splitlines()[0]}); loading "
            "it would unpickle arbitrary objects, which can run code. Pass --weights_only false only if you created "
            "or fully trust the file."
        ) from err
    except (EOFError, RuntimeError) as err:
        raise CorruptCheckpointError(corrupt_message(path, f"truncated or unreadable: {type(err).__name__}: "
                                                           f"{str(err).splitlines()[0] if str(err) else ''}")) from err


# --------------------------------------------------------------------------------------------------- checks
def check_trainer_settings(trainer: Trainer, model: LightningModule) -> None:
    """Refuse Trainer settings that manual optimization cannot honour, with the package's replacement."""
    if getattr(model, "automatic_optimization", True):
        return
    name = type(model).__name__
    if trainer.gradient_clip_val:
        raise ValueError(f"--trainer.gradient_clip_val {trainer.gradient_clip_val} cannot be used with {name}: it "
                         "steps its own optimizer (manual optimization), where Lightning cannot clip. Use "
                         f"--model.init_args.grad_clip_norm {trainer.gradient_clip_val} instead (global L2 norm, "
                         "clipped after every backward pass) and leave trainer.gradient_clip_val unset.")
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(f"--trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} is not supported for "
                         f"{name}: it steps its own optimizer once per batch (two-pass, loss-reading and multi-stream "
                         "optimizers have no accumulation semantics). Use a larger data.init_args.batch_size or more "
                         "devices (--trainer.devices N: the global batch is batch_size * devices).")


# --------------------------------------------------------------------------------------------------- config per run
class RunConfigCallback(SaveConfigCallback):
    """Writes the resolved config into the run's own directory at the start of fit (never for validate / test /
    predict), with the logger's run id filled in, and prints the run id and the resume command at the start, the end
    and on failure. Construct it with ``save_to_log_dir=False`` (the CLI does).

    From ``setup`` to the end of the fit it holds the run directory's ``.fit.lock``, and it refuses a run directory
    whose ``config.yaml`` has other settings (see the module docstring)."""

    _lock: RunLock | None = None
    _refused: tuple[type, str] | None = None  # the refusal found before the fit started, raised in ``setup``

    def take_run_before_fit(self, trainer: Trainer) -> None:
        """Lock the run directory and check its config before ``trainer.fit`` (the CLI's ``before_fit``), on rank zero,
        when the directory is known without starting the logger's experiment (a given W&B id, CSV / TensorBoard
        versions, no logger). Lightning starts the loggers' experiments before any callback's ``setup``: a fit that
        is refused here never starts one, so a refused second fit of a run opens no second W&B run with its id. The
        refusal is raised in :meth:`setup`, on every rank (a new W&B run, whose id is drawn when it starts, is locked
        there)."""
        loggers = trainer.loggers
        if trainer.fast_dev_run or trainer.global_rank != 0 or (loggers and loggers[0].version is None):
            return
        try:
            self._lock_and_check(trainer, self.config.get("ckpt_path"))
        except (ConfigMismatchError, RuntimeError) as err:
            self._release()
            self._refused = (type(err), str(err))
            trainer.loggers = []  # no experiment for a fit that will not run

    def _lock_and_check(self, trainer: Trainer, ckpt_path: Any) -> None:
        from lightning_methods.results.record import run_directory

        run_dir = run_directory(trainer)
        self._lock = RunLock(run_dir, FIT_LOCK, "a fit's run directory").acquire()
        ckpt = trainer.checkpoint_callback
        check_run_config(run_dir, yaml.safe_load(self.parser.dump(self.config, skip_unset=False)), ckpt_path,
                         getattr(ckpt, "dirpath", None))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))
        ckpt_path = self.config.get("ckpt_path")  # trainer.ckpt_path is set only after the setup hooks
        if stage == "fit" and not trainer.fast_dev_run:
            self._take_run(trainer, ckpt_path)
        elif stage != "fit" and owner_run_dir(ckpt_path) is not None:
            return  # evaluating a run's checkpoint: the W&B run config stays the fit's
        super().setup(trainer, pl_module, stage)

    def _take_run(self, trainer: Trainer, ckpt_path: Any) -> None:
        """Lock the run directory and check its config, unless :meth:`take_run_before_fit` did (rank zero decides;
        every rank raises the same error)."""
        error, self._refused = self._refused, None
        if trainer.is_global_zero and error is None and self._lock is None:
            try:
                self._lock_and_check(trainer, ckpt_path)
            except (ConfigMismatchError, RuntimeError) as err:
                self._release()
                error = (type(err), str(err))
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise error[0](error[1])

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if str(getattr(stage, "value", stage)) == "fit":
            self._release()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run = None
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        from lightning_methods.results.record import run_directory

        run_dir = run_directory(trainer)
        run_id = trainer.loggers[0].version if trainer.loggers else None
        config = self.config.clone()
        config["ckpt_path"] = None
        if run_id is not None:
            config_set_run_id(config, run_id)
        atomic_write_text(run_dir / CONFIG_NAME, self.parser.dump(config, skip_unset=False))
        ckpt = trainer.checkpoint_callback
        last = Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else None
        self._run = (run_dir, run_id, last)
        self._announce("started")

    def _announce(self, what: str) -> None:
        if not getattr(self, "_run", None):
            return
        run_dir, run_id, last = self._run
        print(f"{PREFIX} run {run_id if run_id is not None else '-'} {what}: {run_dir} (config: {CONFIG_NAME})",
              flush=True)
        if last is not None:
            print(f"{PREFIX} resume it with: {resume_command(run_dir, last)}", flush=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._announce("finished")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()
        self._announce(f"stopped ({type(exception).__name__})")


# --------------------------------------------------------------------------------------------------- errors
def package_error(exc: BaseException) -> BaseException | None:
    """The innermost exception of ``exc``'s chain that was raised by lightning-methods code (or ``None``)."""
    found, seen, current = None, set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("lightning_methods"):
            found = current
        # `raise ... from None` hides the context: it is not part of what went wrong
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return found


def print_package_error(exc: BaseException, file: Any = None) -> bool:
    """Print ``exc``'s traceback, then the package's own error message framed as the last lines; ``False`` (nothing
    printed) when no lightning-methods code raised anything in the chain."""
    own = package_error(exc)
    if own is None:
        return False
    file = file or sys.stderr
    traceback.print_exception(exc, file=file)
    bar = "=" * 100
    print(f"\n{bar}\nlightning-methods: error: {type(own).__name__}: {own}\n{bar}", file=file, flush=True)
    return True


def run_console(fn: Any, *args: Any) -> Any:
    """Run a console-script entry ``fn(*args)``: an error raised by lightning-methods code ends the process with exit
    code 1 after :func:`print_package_error` (traceback, then the package's message framed as the last lines)."""
    try:
        return fn(*args)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised unless the package raised it
        if print_package_error(exc):
            raise SystemExit(1) from None
        raise
