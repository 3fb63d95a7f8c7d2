"""The LightningCLI of ``lightning-methods`` (fit / validate / test / predict): the package's links, parser groups,
defaults and hooks (described in :mod:`lightning_methods.cli`, which imports this module only when a LightningCLI
subcommand runs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_methods import cli_runs
from lightning_methods.callbacks.checkpoint import LatestCheckpoint
from lightning_methods.callbacks.nonfinite_guard import NonFiniteGuard
from lightning_methods.cli import default_precision, import_public_classes
from lightning_methods.results.cli_hooks import add_result_arguments, attach_run_config
from lightning_methods.utils.quiet import quiet_wandb
from lightning_methods.utils.wandb import finish_open_run, finish_runs, log_config, plain

import_public_classes()  # short class names (--model ImageClassifier, --data DigitsDataModule) resolve


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
    """LightningCLI with the package's links, defaults and extras (see the module docstring).

    A command line that starts with a subcommand (``fit ...``) gets the parser of that subcommand only: LightningCLI
    builds all four (about a tenth of a second of jsonargparse work each, a quarter of a ``fit``'s start-up on a
    small config) although one runs. Anything else (``--help``, a top-level ``--config``) gets all four."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        argv = kwargs.get("args")
        argv = sys.argv[1:] if argv is None else argv
        first = argv[0] if isinstance(argv, (list, tuple)) and argv else None
        every = LightningCLI.subcommands()
        self._only_subcommand = only = first if first in every else None
        if only and kwargs.get("parser_kwargs"):  # per-subcommand parser kwargs of the parsers not built are dropped
            kwargs["parser_kwargs"] = {k: v for k, v in kwargs["parser_kwargs"].items() if k == only or k not in every}
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]  # LightningCLI's is a staticmethod
        every = LightningCLI.subcommands()
        only = getattr(self, "_only_subcommand", None)
        return {only: every[only]} if only else every

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
        for callback in self.trainer.callbacks:  # lock the run before any logger starts (cli_runs)
            if isinstance(callback, cli_runs.RunConfigCallback):
                callback.take_run_before_fit(self.trainer)

    def after_instantiate_classes(self) -> None:
        attach_run_config(self)  # the resolved config goes into results.json
        quiet_wandb(self.trainer.loggers)  # no "anonymous setting has no effect" warning

    def after_fit(self) -> None:
        mode = self.config.get(self.subcommand, {}).get("test_after_fit", "off")
        if mode == "off" or self.trainer.interrupted:
            return
        ckpt = "best" if mode == "best" and self.trainer.checkpoint_callback.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True)


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningMethodsCLI | None:
    """Create the CLI (and run the subcommand when ``run``); returns it so tests can inspect the trainer (``None``
    when ``fit --ckpt_path`` names a run that has already finished: nothing is run, a message says what to do)."""
    try:
        cli_runs.check_wandb_ids(sys.argv[1:] if args is None else list(args))  # an id such as 12345e67: cli_runs
        with cli_runs.quiet():  # no warnings caused by the package's own calls
            cli = _make_cli(args, run)
    except cli_runs.RunFinished as finished:  # fit --ckpt_path of a finished run: nothing to do (exit code 0)
        print(finished, flush=True)
        return None
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
