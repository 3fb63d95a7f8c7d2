"""Run configs over seeds and a grid of overrides, one run after another; resumable; or emit a W&B sweep / commands.

    lightning-methods grid --config configs/sam/cifar100_wrn28_10_{sam,samon}.yaml \\
        --seeds 0 1 2 --grid_dir runs/grid/sam_vs_samon [--set model.init_args.optimizer.init_args.rho=0.5,1.0] \\
        [-- --data.init_args.data_dir DIR --trainer.max_epochs 200]

Layout (each configuration is a :class:`~lightning_methods.runs.StagedRun` of kind ``grid``)::

    GRID_DIR/<config name>/state.json, config.yaml, .lock     fingerprint of the configuration, finished runs
    GRID_DIR/<config name>/[<key>=<value>,.../]seed<k>/       one run: run.yaml (its complete config), results.json,
                                                               metrics.csv, checkpoints/, wandb/

- Every run is ``lightning-methods fit --config <run>/run.yaml`` (``--ckpt_path <run>/checkpoints/last.ckpt`` when it
  was interrupted); ``run.yaml`` is the resolved config plus the run's seed(s), overrides, directories and W&B run (a
  fixed id, so a resumed run continues its W&B run; group ``<config name>-<combination>``).
- A run is finished when its ``results.json`` says so; finished runs are skipped, interrupted ones resumed.
- The fingerprint of a configuration is its resolved config without the seed keys and the ``--set`` keys: running a
  changed config (or other fit arguments) into an existing grid directory stops with the fields that differ. More
  seeds or more values for the same keys may be added later.
- ``--mode commands`` writes ``GRID_DIR/commands.txt`` (one ``lightning-methods grid --run RUN_DIR`` per unfinished
  run) for a cluster scheduler; ``--mode sweep`` writes ``GRID_DIR/<config name>/sweep.yaml`` for ``wandb sweep``.
- Runs start in this process when they use one device, else as a subprocess (Lightning's DDP launcher re-runs the
  command it was started with, which must be the ``fit``); ``--launch`` overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from lightning_methods.results import gridspec as gs
from lightning_methods.results.grid_commands import COMMANDS, HEADER, command_of
from lightning_methods.results.gridspec import GRID_NEUTRAL
from lightning_methods.results.record import read_record
from lightning_methods.runs import StagedRun, config_fingerprint
from lightning_methods.utils import atomic_write_text


def resolve_config(args: list[str], command: str = "fit") -> dict[str, Any]:
    """The resolved ``fit`` config of ``args`` (``--config ...`` and overrides), as LightningCLI prints it (another
    ``command`` of :mod:`.grid_commands`: its own resolved config).

    Raises:
        ValueError: the arguments do not parse (the CLI's message is printed above).
    """
    from lightning_methods.cli import main

    if command != "fit":
        return COMMANDS[command].resolve(args)

    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")  # the grid's own argv
        try:
            main(["fit", *args, "--print_config"])
        except SystemExit as done:
            if done.code not in (0, None):
                raise ValueError(f"`lightning-methods fit {' '.join(args)}` does not parse (see the message above)"
                                 ) from None
    return yaml.safe_load(out.getvalue())


def run_finished(run_dir: Path) -> bool:
    """The run's ``results.json`` records a finished fit (another command: that command's own test)."""
    command = command_of(run_dir / "run.yaml") if (run_dir / "run.yaml").is_file() else "fit"
    if command != "fit":
        return COMMANDS[command].finished(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        return False
    record = read_record(path)
    return bool(record) and record.get("command") == "fit" and record.get("status") == "finished"


def _single_device(config: dict[str, Any]) -> bool:
    import torch

    trainer = config.get("trainer") or {}
    devices, accelerator = trainer.get("devices", "auto"), trainer.get("accelerator", "auto")
    if str(devices) in ("1", "[0]") or accelerator == "cpu" and str(devices) in ("auto", "1"):
        return True
    return str(devices) == "auto" and torch.cuda.device_count() <= 1


def run_one(run_dir: str | Path, launch: str = "auto") -> dict[str, Any]:
    """Run (or resume, or skip) the prepared run in ``run_dir``; returns its ``results.json`` record.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``run.yaml``.
        RuntimeError: the fit ended without a finished record.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    config_file = run_dir / "run.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: prepare the run with `lightning-methods grid --config "
                                "... --mode commands` (or run the whole grid)")
    config = yaml.safe_load(config_file.read_text())
    command = command_of(config_file)
    with StagedRun(run_dir, "grid_run", config_fingerprint(config, GRID_NEUTRAL)) as run:
        if command != "fit":
            spec = COMMANDS[command]
            if not spec.finished(run_dir):
                print(f"[grid] running lightning-methods {command} in {run_dir}", flush=True)
                spec.run(config_file, run_dir)
            if not spec.finished(run_dir):
                raise RuntimeError(f"the {command} run in {run_dir} did not finish; rerun the grid command to "
                                   "resume it")
            run.mark_done(command)
            return read_record(spec.record(run_dir)) or {}
        if run_finished(run_dir):
            run.mark_done("fit")
            return read_record(run_dir / "results.json") or {}
        last = run_dir / "checkpoints" / "last.ckpt"
        args = ["fit", "--config", str(config_file)] + (["--ckpt_path", str(last)] if last.is_file() else [])
        print(f"[grid] {'resuming' if last.is_file() else 'starting'} {run_dir}", flush=True)
        if launch == "subprocess" or (launch == "auto" and not _single_device(config)):
            subprocess.run([sys.executable, "-m", "lightning_methods.cli", *args], check=True)
        else:
            _fit_in_process(args)
        if not run_finished(run_dir):
            raise RuntimeError(f"the run in {run_dir} ended without a finished results.json; see its output above "
                               "and rerun the grid command to resume it")
        run.mark_done("fit")
        return read_record(run_dir / "results.json") or {}


def _fit_in_process(args: list[str]) -> None:
    import torch

    from lightning_methods.cli import build_cli

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")  # the grid's own argv
        cli = build_cli(args)
    del cli
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare(config_path: str, fit_args: list[str], sets: dict[str, list[str]], seeds: list[int],
            seed_keys: list[str], grid_dir: Path, command: str = "fit") -> tuple[StagedRun, list[tuple[str, Path]]]:
    """Resolve the configuration, check it against an existing grid directory and write every ``run.yaml``.

    Returns the (open, locked) :class:`StagedRun` of the configuration and its runs ``(name, run_dir)``.
    """
    name = gs.safe_name(Path(config_path).stem)
    base = resolve_config(["--config", config_path, *fit_args], command)
    if command != "fit" and seed_keys == list(gs.DEFAULT_SEED_KEYS):
        seed_keys = list(COMMANDS[command].seed_keys)
    gs.check_keys(base, list(sets), config_path)
    seed_keys = [k for k in seed_keys if gs.has_key(base, k)]
    if not seed_keys:
        raise KeyError(f"{config_path} has none of the seed keys given; name the keys that take the seed with "
                       "--seed_keys (e.g. seed_everything)")
    fingerprint = copy.deepcopy(base)
    for key in [*sets, *seed_keys]:
        gs.delete_key(fingerprint, key)
    fingerprint = {"config": config_fingerprint(fingerprint, GRID_NEUTRAL), "swept": sorted(sets),
                   "seed_keys": seed_keys}
    run = StagedRun(grid_dir / name, "grid", fingerprint, config_text=yaml.safe_dump(base, sort_keys=False)).open()
    names = gs.short_names(list(sets))
    runs = []
    try:
        for combo in gs.combinations(sets):
            resolved = resolve_config(["--config", config_path, *fit_args, *(f"--{k}={v}" for k, v in combo.items())],
                                      command)
            for seed in seeds:
                stage = gs.run_name(combo, names, seed)
                run_dir = (run.run_dir / stage).resolve()
                cfg = copy.deepcopy(resolved)
                for key in seed_keys:
                    gs.set_key(cfg, key, seed)
                if command != "fit":
                    COMMANDS[command].place(cfg, run_dir)
                else:
                    gs.set_key(cfg, "trainer.default_root_dir", str(run_dir))
                    gs.set_key(cfg, "checkpoint.dirpath", str(run_dir / "checkpoints"))
                    gs.set_key(cfg, "results.info", {"grid": str(run.run_dir.parent), "config": str(
                        Path(config_path).resolve()), "name": name, "combination": dict(combo), "seed": seed,
                        "run": stage})
                    _wandb_settings(cfg, run, name, stage=stage, combo=gs.combo_name(combo, names), run_dir=run_dir)
                if not run_finished(run_dir):
                    header = f"{HEADER}{command}\n" if command != "fit" else ""
                    atomic_write_text(run_dir / "run.yaml", header + yaml.safe_dump(cfg, sort_keys=False))
                runs.append((stage, run_dir))
    except BaseException:
        run.close()
        raise
    return run, runs


def _wandb_settings(cfg: dict[str, Any], run: StagedRun, name: str, stage: str, combo: str, run_dir: Path) -> None:
    loggers = (cfg.get("trainer") or {}).get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
            args = logger.setdefault("init_args", {})
            group = f"{name}-{combo}" if combo else name
            args.update({"save_dir": str(run_dir), "name": f"{group}-{stage.rsplit('/', 1)[-1]}", "group": group,
                         "job_type": name, "id": run.wandb_id(stage), "resume": "allow"})


class GridProgress:
    """Progress of a grid on stdout: ``[grid] run k of N`` before each run, and after it the time it took, the time
    since the grid started and the estimated time left (mean time of the runs trained so far x the runs left to
    train; runs that had finished earlier are skipped and not counted)."""

    def __init__(self, run_dirs: list[Path]) -> None:
        self.total = len(run_dirs)
        self.pending = sum(not run_finished(d) for d in run_dirs)
        self.k, self.trained, self.seconds = 0, 0, 0.0
        self.start = self.run_start = time.monotonic()
        self.skipped = False

    def begin(self, run_dir: Path) -> None:
        self.k += 1
        self.skipped = run_finished(run_dir)
        self.run_start = time.monotonic()
        state = "finished earlier, skipped" if self.skipped else f"{self.pending} of {self.total} left to train"
        print(f"[grid] run {self.k} of {self.total}: {run_dir} ({state})", flush=True)

    def end(self, run_dir: Path, failed: bool = False) -> None:
        if self.skipped:
            return
        took = time.monotonic() - self.run_start
        self.pending = max(self.pending - 1, 0)
        self.trained += 1
        self.seconds += took
        eta = self.seconds / self.trained * self.pending
        runs = f"{self.pending} run{'s' if self.pending > 1 else ''}"
        left = f"about {format_seconds(eta)} left ({runs} to train)" if self.pending else "no runs left"
        print(f"[grid] run {self.k} of {self.total} {'failed' if failed else 'done'} in {format_seconds(took)}; "
              f"{format_seconds(time.monotonic() - self.start)} elapsed, {left}", flush=True)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-methods grid", description=__doc__.split("\n")[0],
        epilog="Arguments after `--` go to every `lightning-methods fit` (e.g. -- --data.init_args.data_dir DIR). "
               "Then: `lightning-methods table GRID_DIR`. Details: docs/results.md.")
    parser.add_argument("--config", nargs="+", help="one or more configs; each is its own set of runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a config key and its values (repeat for more keys: every combination runs)")
    parser.add_argument("--grid_dir", help="grid directory (default: runs/grid/<first config name>)")
    parser.add_argument("--mode", choices=("run", "commands", "sweep"), default="run",
                        help="run the grid here (default), write commands.txt for a scheduler, or W&B sweep files")
    parser.add_argument("--seed_keys", nargs="+", default=list(gs.DEFAULT_SEED_KEYS),
                        help="config keys that take the seed, where present (default: %(default)s)")
    parser.add_argument("--launch", choices=("auto", "inprocess", "subprocess"), default="auto",
                        help="start runs in this process or as subprocesses (auto: subprocess for multi-device runs)")
    parser.add_argument("--keep_going", action="store_true", help="continue with the next run after a failure")
    parser.add_argument("--command", choices=("fit", *COMMANDS), default="fit",
                        help="the command each run executes (default fit; ood: the EncMin2L pipeline, seed key seed)")
    parser.add_argument("--run", metavar="RUN_DIR", help="run (or resume) one prepared run (for scheduler jobs)")
    return parser


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    """Entry point of ``lightning-methods grid`` (see the module docstring); returns the records of the runs."""
    argv = list(sys.argv[1:] if args is None else args)
    fit_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.run:
        return [run_one(ns.run, ns.launch)]
    if not ns.config:
        parser.error("give --config CFG [CFG ...] (or --run RUN_DIR)")
    try:
        sets = gs.parse_sets(ns.set)
    except ValueError as err:
        parser.error(str(err))
    missing = [c for c in ns.config if not Path(c).is_file()]
    if missing:
        parser.error(f"--config: no such file: {', '.join(missing)}")
    grid_dir = Path(ns.grid_dir or Path("runs/grid") / gs.safe_name(Path(ns.config[0]).stem)).expanduser().resolve()
    if ns.mode == "sweep":
        if ns.command != "fit":
            parser.error(f"--mode sweep runs `fit` only; run --command {ns.command} grids with --mode run or commands")
        return _write_sweeps(ns.config, fit_args, sets, seeds=ns.seeds, seed_keys=ns.seed_keys, grid_dir=grid_dir)
    records, commands, failures = [], [], []
    prepared: list[tuple[StagedRun, list[tuple[str, Path]]]] = []
    try:
        for config_path in ns.config:  # every configuration first, so the progress knows the number of runs
            prepared.append(
                prepare(
                    config_path,
                    fit_args,
                    sets,
                    seeds=ns.seeds,
                    seed_keys=ns.seed_keys,
                    grid_dir=grid_dir,
                    command=ns.command,
                )
            )
        progress = GridProgress([d for _, runs in prepared for _, d in runs])
        for run, runs in prepared:
            for stage, run_dir in runs:
                if ns.mode == "commands":
                    if not run_finished(run_dir):
                        commands.append(f"lightning-methods grid --run {run_dir}")
                    continue
                progress.begin(run_dir)
                try:
                    record = run_one(run_dir, ns.launch)
                except Exception as err:
                    progress.end(run_dir, failed=True)
                    if not ns.keep_going:
                        raise RuntimeError(f"run {run_dir} failed ({type(err).__name__}: {err}); rerun the same grid "
                                           "command to resume it (finished runs are skipped)") from err
                    failures.append(f"{run_dir}: {type(err).__name__}: {err}")
                    continue
                progress.end(run_dir)
                run.mark_done(stage, {"run_dir": str(run_dir), "metrics": record.get("metrics", {})})
                records.append(record)
    finally:
        for run, _ in prepared:
            run.close()
    if ns.mode == "commands":
        atomic_write_text(grid_dir / "commands.txt", "".join(f"{c}\n" for c in commands))
        print(f"{len(commands)} unfinished runs; commands in {grid_dir / 'commands.txt'}")
        return []
    if failures:
        raise RuntimeError(f"{len(failures)} runs failed:\n  " + "\n  ".join(failures))
    print(f"[grid] {len(records)} runs finished in {grid_dir}; table: lightning-methods table {grid_dir}")
    return records


def _write_sweeps(configs: list[str], fit_args: list[str], sets: dict[str, list[str]], seeds: list[int],
                  seed_keys: list[str], grid_dir: Path) -> list[dict[str, Any]]:
    sweeps = []
    for config_path in configs:
        base = resolve_config(["--config", config_path, *fit_args])
        gs.check_keys(base, list(sets), config_path)
        seed_key = next((k for k in seed_keys if gs.has_key(base, k)), "seed_everything")
        ckpt = base.get("checkpoint") or {}
        name = gs.safe_name(Path(config_path).stem)
        sweep = gs.sweep_definition(
            name,
            str(Path(config_path).resolve()),
            fit_args,
            sets=sets,
            seeds=seeds,
            seed_key=seed_key,
            monitor=ckpt.get("monitor") or "val/acc",
            mode=ckpt.get("mode") or "max",
        )
        path = grid_dir / name / "sweep.yaml"
        atomic_write_text(path, yaml.safe_dump(sweep, sort_keys=False))
        print(f"W&B sweep for {config_path}: {path}\n  wandb sweep {path}   # then: wandb agent <sweep id>")
        sweeps.append(sweep)
    return sweeps
