"""How the ``lightning-methods`` CLI wires the result files: two parser groups and one hook.

- ``--results.*`` (:class:`~lightning_methods.callbacks.ResultsWriter`): every fit / validate / test writes
  ``results.json`` and ``metrics.csv`` into its run directory and keeps the best validation values in W&B;
- ``--predictions.*`` (:class:`~lightning_methods.callbacks.PredictionWriter`): ``predict`` writes
  ``predictions.csv`` there;
- :func:`attach_run_config` hands the resolved config and the config files to the ResultsWriter.

Like ``--checkpoint.*``, the groups are parser groups rather than ``trainer.callbacks`` entries, so a config that
sets its own callbacks keeps them.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from lightning_methods.callbacks.prediction_writer import PredictionWriter
from lightning_methods.callbacks.results_writer import ResultsWriter
from lightning_methods.utils.wandb import plain


def add_result_arguments(parser: LightningArgumentParser) -> None:
    """Add the ``results`` and ``predictions`` callback groups to a LightningCLI parser."""
    parser.add_lightning_class_args(ResultsWriter, "results")
    parser.add_lightning_class_args(PredictionWriter, "predictions")


def attach_run_config(cli: Any) -> None:
    """Give the ResultsWriter of ``cli.trainer`` the resolved config (with the linked ``num_classes``) and the
    absolute paths of the ``--config`` files of the command."""
    writers = [cb for cb in cli.trainer.callbacks if isinstance(cb, ResultsWriter)]
    if not writers:
        return
    subcommand = cli.subcommand
    config = cli.config.get(subcommand, cli.config) if subcommand else cli.config
    files = [_abs_path(p) for p in (config.get("config") or [])]
    resolved = {k: v for k, v in plain(config).items() if k != "config"}
    hparams = getattr(cli.model, "hparams", {})
    if "num_classes" in hparams and isinstance(resolved.get("model"), dict):
        resolved["model"].setdefault("init_args", {})["num_classes"] = hparams["num_classes"]
    for writer in writers:
        writer.set_run_config(resolved, files, subcommand)


def _abs_path(path: Any) -> str:
    absolute = getattr(path, "absolute", None)  # jsonargparse.Path
    return str(absolute) if absolute else os.path.abspath(str(path))
