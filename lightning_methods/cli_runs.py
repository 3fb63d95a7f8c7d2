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
- **Errors.** :func:`print_package_error` prints the package's own message (found inside jsonargparse's wrapped
  errors and their Namespace dumps) last and framed, after the traceback.
"""

from __future__ import annotations

import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from lightning_methods.runs import NEUTRAL_KEYS, config_fingerprint, fingerprint_diff
from lightning_methods.utils.io import atomic_write_text

#: config keys that a resumed run may change: paths, display, checkpointing and evaluation choices
RESUME_NEUTRAL = NEUTRAL_KEYS | {"ckpt_path", "weights_only", "test_after_fit", "checkpoint", "nonfinite_guard",
                                 "results", "predictions", "config", "print_config"}
CONFIG_NAME = "config.yaml"
PREFIX = "[lightning-methods]"


class ResumeError(ValueError):
    """``--ckpt_path last`` found no run of this config to resume."""


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


def resolve_last_checkpoint(config: Any, dumped: dict[str, Any]) -> str | None:
    """For ``--ckpt_path last``: set ``ckpt_path`` (and the logger's run id) of ``config`` to the latest run of the same
    config, and return a line saying so; ``None`` if ``ckpt_path`` is not ``"last"``.

    Args:
        config: the subcommand config (edited in place).
        dumped: the same config as plain YAML data (``yaml.safe_load(parser.dump(config))``), for the comparison
            with the ``config.yaml`` of each run.

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
        return f"{PREFIX} resuming from {last}"
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
        except (OSError, yaml.YAMLError):
            diff = [f"<no readable {CONFIG_NAME}>"]
        if not diff:
            if key:
                config_set_run_id(config, run_dir.name, key)
            config["ckpt_path"] = str(last)
            return f"{PREFIX} --ckpt_path last: resuming run {run_dir.name}, the latest of {len(runs)} run(s) in {root}"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last.stat().st_mtime))
        shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
        listing.append(f"  run {run_dir.name} (last saved {when}; differs in {shown})\n"
                       f"      {resume_command(run_dir, last)}")
    raise ResumeError("--ckpt_path last: no run under " + str(root) + " has this config, so nothing was resumed "
                      "(a run with different settings would mix two experiments). Runs found, newest first, with "
                      "the command that resumes each with its own config (append overrides such as --trainer."
                      "max_epochs N to continue one with other settings):\n" + "\n".join(listing[:10]))


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
    if _get(config, "ckpt_path") == "last":
        dumped = yaml.safe_load(cli._parser(sub).dump(config, skip_unset=False))
        line = resolve_last_checkpoint(config, dumped)
        if line:
            print(line, flush=True)


def parse_ckpt_path_safely(cli: Any, parse: Any) -> None:
    """Run LightningCLI's ``_parse_ckpt_path`` (``parse``, which reads the hyperparameters of ``--ckpt_path``) after
    verifying the file's recorded checksum, turning a corrupt or code-carrying file into a clear error."""
    import pickle

    from lightning_methods.checkpoint_io import CorruptCheckpointError, corrupt_message, verify_checksum

    sub = cli.config.get("subcommand")
    path = cli.config[sub].get("ckpt_path") if sub else None
    if path and Path(path).is_file():
        verify_checksum(path)  # raises CorruptCheckpointError naming the previous good checkpoint
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
    and on failure. Construct it with ``save_to_log_dir=False`` (the CLI does)."""

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
        current = current.__cause__ or current.__context__
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
