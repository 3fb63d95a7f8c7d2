"""``lightning-methods`` command line: LightningCLI with subcommands fit / validate / test / predict.

- model and data are chosen in subclass mode (``model.class_path``, ``data.class_path``); short class names of
  this package resolve because its modules are imported here;
- ``data.num_classes`` is linked to ``model.init_args.num_classes``;
- the resolved config of a fit is saved in its own run directory (``<run dir>/config.yaml``) and, when a
  ``WandbLogger`` is used, written into the W&B run config; every fit prints its run id and resume command, and
  ``--ckpt_path last`` finds the run of the same config (``lightning_methods.cli_runs``);
- ``--checkpoint.*`` configures the always-present ModelCheckpoint (best ``val/acc`` plus ``last.ckpt``, crash-safe
  and checksummed: ``lightning_methods.checkpoint_io``); ``--nonfinite_guard.*`` stops diverged runs;
- checkpoints load with ``--weights_only true`` by default;
- ``--test_after_fit best|last`` runs the test set after ``fit`` on the best checkpoint or the final weights;
- ``trainer.precision`` defaults to ``bf16-mixed`` on a GPU that supports it and ``32-true`` otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_methods  # noqa: F401  (registers the package's classes for short class_path names)
import lightning_methods.callbacks  # noqa: F401
import lightning_methods.datamodules  # noqa: F401
from lightning_methods import cli_runs
from lightning_methods.callbacks.checkpoint import LatestCheckpoint
from lightning_methods.callbacks.nonfinite_guard import NonFiniteGuard
from lightning_methods.results.cli_hooks import add_result_arguments, attach_run_config
from lightning_methods.utils.wandb import finish_open_run, finish_runs, log_config, plain


def default_precision() -> str:
    """bf16-mixed on a CUDA GPU with bf16 support, 32-true otherwise."""
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


class LoggerSaveConfigCallback(cli_runs.RunConfigCallback):
    """Saves the resolved config into the run's own directory (fit only, see ``cli_runs``) and into the W&B run config
    (rank zero only)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = plain(self.config)
        # linked arguments are not part of the parsed config: add them so the run config is complete
        if "num_classes" in pl_module.hparams:
            config.setdefault("model", {}).setdefault("init_args", {})["num_classes"] = pl_module.hparams.num_classes
        log_config(trainer.loggers, config)


class LightningMethodsCLI(LightningCLI):
    """LightningCLI with the package's links, defaults and extras (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(LatestCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--test_after_fit",
            type=Literal["off", "best", "last"],
            default="off",
            help="After fit, evaluate the test set on the best checkpoint ('best') or the final weights ('last').",
        )
        add_result_arguments(parser)  # --results.* (results.json, metrics.csv), --predictions.* (predictions.csv)
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite_guard")  # stops diverged runs (issue 18)

    def before_instantiate_classes(self) -> None:
        # W&B's service process outlives a run and keeps the working directory it started in: a relative save_dir
        # is resolved here, against the directory the command runs in, so runs never land elsewhere (notebooks)
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        loggers = config.get("trainer", {}).get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if str(getattr(logger, "class_path", "")).endswith("WandbLogger") and init_args is not None:
                save_dir = init_args.get("save_dir") or "."
                init_args["save_dir"] = str(Path(save_dir).expanduser().resolve())
        cli_runs.apply_cli_defaults(self)  # weights_only=True by default; --ckpt_path last finds the run (cli_runs)

    def _parse_ckpt_path(self) -> None:
        cli_runs.parse_ckpt_path_safely(self, super()._parse_ckpt_path)  # a corrupt checkpoint stops with a clear error

    def before_fit(self) -> None:
        cli_runs.check_trainer_settings(self.trainer, self.model)  # gradient_clip_val, accumulate_grad_batches

    def after_instantiate_classes(self) -> None:
        attach_run_config(self)  # the resolved config goes into results.json

    def after_fit(self) -> None:
        mode = self.config.get(self.subcommand, {}).get("test_after_fit", "off")
        if mode == "off" or self.trainer.interrupted:
            return
        ckpt = "best" if mode == "best" and self.trainer.checkpoint_callback.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True)


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningMethodsCLI:
    """Create the CLI (and run the subcommand when ``run``); returns it so tests can inspect the trainer."""
    try:
        cli = _make_cli(args, run)
    except BaseException:
        finish_open_run(exit_code=1)  # a WandbLogger created later in this process would log into it
        raise
    if run and cli.trainer.is_global_zero:
        finish_runs(cli.trainer.loggers)  # the run's files are complete when main returns (notebooks, tests)
    return cli


def _make_cli(args: list[str] | None, run: bool) -> LightningMethodsCLI:
    return LightningMethodsCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},  # config.yaml goes into the run dir
        seed_everything_default=0,
        trainer_defaults={"precision": default_precision()},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


#: The package's commands besides LightningCLI's fit / validate / test / predict. Each runs as ``lightning-methods
#: <name> ...`` and as the console script ``lightning-methods-<name> ...``; its module (imported only when the command
#: runs) has ``main(args: list[str] | None = None)`` and a module docstring whose first line is the help summary.
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("lightning_methods.results.catalog", "methods, configs, backbones and DataModules of the package"),
    "grid": ("lightning_methods.results.grid", "run a config over seeds and a grid of overrides (resumable)"),
    "table": ("lightning_methods.results.table", "mean +- std tables and learning curves from finished runs"),
    "select": ("lightning_methods.noisy_labels.cli", "Early Cutting: selection rounds, the cut, final training"),
    "fed": ("lightning_methods.federated.cli", "federated rounds (FedFree and the HtFL/HmFL baselines)"),
    "ood": ("lightning_methods.ood.cli", "EncMin2L OOD pipeline: embed, fit RDMs, score, calibrate, report"),
    "prototypes": ("lightning_methods.hpn.cli", "hyperspherical prototypes for HPN (.npy)"),
    "hpn-sweep": ("lightning_methods.hpn.sweep", "HPN multi-task sweep over the task weight t (accuracy, MAE)"),
    "locality": ("lightning_methods.vit_locality.cli", "attention-locality table from ViT checkpoints"),
    "probe": ("lightning_methods.tunnel.cli", "Tunnel Effect: layer-wise linear probes and rank of a checkpoint"),
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def run_command(name: str, args: list[str] | None = None) -> Any:
    """Run the package command ``name`` (a key of :data:`COMMANDS`) with ``args``."""
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    return module.main(args)


def _command_help() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = ["", "Commands of the package (also installed as lightning-methods-<command>; each has --help):"]
    lines += [f"  {name:<{width}}{summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-methods`` console script: LightningCLI's subcommands, or one of
    :data:`COMMANDS` (``lightning-methods list``, ``lightning-methods select --config ...``). From the console
    (``args=None``) an error of the package ends with its own message, framed, as the last lines (exit code 1)."""
    if args is None:
        return cli_runs.run_console(main, sys.argv[1:])
    argv = list(args)
    if argv and argv[0] in COMMANDS:
        run_command(argv[0], argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        try:
            build_cli(argv)
        finally:
            print(_command_help())
        return
    build_cli(argv)


def _script(name: str) -> Any:
    def entry(args: list[str] | None = None) -> Any:
        if args is None:  # the console script: the package's own error message last (see main)
            # nothing is returned: the console-script wrapper passes the return value to sys.exit, where anything
            # but None means "failed" (exit status 1, the value printed to stderr)
            cli_runs.run_console(run_command, name, sys.argv[1:])
            return None
        return run_command(name, args)

    entry.__name__ = entry.__qualname__ = f"{name.replace('-', '_')}_main"
    entry.__doc__ = f"Entry point of the ``lightning-methods-{name}`` console script: {COMMANDS[name][1]}."
    return entry


list_main = _script("list")
grid_main = _script("grid")
table_main = _script("table")
select_main = _script("select")
fed_main = _script("fed")
ood_main = _script("ood")
prototypes_main = _script("prototypes")
hpn_sweep_main = _script("hpn-sweep")
locality_main = _script("locality")
probe_main = _script("probe")


if __name__ == "__main__":  # pragma: no cover
    main()
