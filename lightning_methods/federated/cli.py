"""Run federated learning (FedFree and the HtFL / HmFL baselines) from a YAML config, resumable after a kill.

Usage::

    lightning-methods-fed --config configs/federated/cifar100_htfe8_20clients.yaml --data.data_dir DIR
    lightning-methods fed --config configs/federated/digits_demo.yaml           # offline demo, FedFree vs Local-only
    lightning-methods-fed table runs/fedfree/cifar100_htfe8_20clients runs/fedfree/cifar100_htfe8_20clients_fedgh

The config holds ``run_dir``, ``data`` (:class:`~lightning_methods.datamodules.FederatedDataModule`),
``federation`` (:class:`~lightning_methods.federated.config.FederationConfig`), ``algorithm`` (a
:class:`~lightning_methods.federated.algorithm.FedAlgorithm` as ``class_path`` / ``init_args``), optional
``compare_with`` (more algorithms run on the same partition and client models), ``trainer`` (keyword arguments of
the per-client Trainers) and ``logger`` (a Lightning logger, W&B by default in the shipped configs). Each algorithm
runs in ``run_dir/<algorithm name>/``; rerunning the same command resumes from the last completed round, and a run
directory written with other settings is refused. ``table`` prints the comparison table of finished runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lightning_methods.datamodules.federated import FederatedDataModule
from lightning_methods.federated.algorithm import FedAlgorithm
from lightning_methods.federated.config import FederationConfig
from lightning_methods.federated.results import comparison_table, load_summary, to_csv
from lightning_methods.runs import config_fingerprint
from lightning_methods.utils import atomic_write_text

#: Config keys that never change results (besides runs.NEUTRAL_KEYS).
RUN_KEYS = ("config", "run_dir", "resume", "progress", "compare_with", "logger", "profile_steps")


def build_parser() -> ArgumentParser:
    """The ``lightning-methods-fed`` parser."""
    import lightning_methods.federated as federated

    for name in federated.__all__:  # import every algorithm: --help lists them all, --algorithm.help NAME resolves
        getattr(federated, name)
    parser = ArgumentParser(prog="lightning-methods fed", description=__doc__.splitlines()[0],
                            epilog="lightning-methods-fed table RUN_DIR [RUN_DIR ...] prints the comparison table "
                                   "(final-round and best-over-rounds accuracy) of finished runs.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file")
    parser.add_argument("--run_dir", type=str, default="runs/fed", help="directory of checkpoints and results")
    parser.add_argument("--resume", type=bool, default=True,
                        help="continue a run found in run_dir (false: refuse to touch an existing run)")
    parser.add_argument("--progress", type=bool, default=True, help="progress bar over rounds")
    parser.add_argument("--profile_steps", type=bool, default=False,
                        help="time training steps apart from per-round overhead (synchronises the GPU per step)")
    for name, cls in SECTIONS.items():
        parser.add_class_arguments(cls, name)
    parser.add_subclass_arguments(FedAlgorithm, "algorithm", required=True)
    parser.add_argument("--compare_with", type=list[FedAlgorithm], default=[],
                        help="further algorithms to run on the same partition and client models")
    parser.add_argument("--trainer", type=dict, default={"accelerator": "auto", "devices": 1, "precision": "32-true"},
                        help="keyword arguments of every client-round Trainer")
    parser.add_argument("--logger", type=dict | None, default=None,
                        help="{class_path, init_args} of a Lightning logger for round metrics (e.g. WandbLogger)")
    return parser


#: the config sections that hold one class's arguments (also what a run's fingerprint is checked against)
SECTIONS = {"data": FederatedDataModule, "federation": FederationConfig}


def fingerprint(cfg: Namespace, algorithm_cfg: Any) -> dict[str, Any]:
    """The settings of one algorithm's run that change its results (a run directory refuses other settings)."""
    base = config_fingerprint({k: v for k, v in cfg.as_dict().items() if k not in RUN_KEYS})
    base["algorithm"] = config_fingerprint(algorithm_cfg)
    return base


def run_config(cfg: Namespace, parser: ArgumentParser) -> list[dict[str, Any]]:
    """Run every algorithm of a parsed config; returns their summaries (and writes ``comparison.md/csv``)."""
    from lightning_methods.federated.runner import FederatedRunner

    init = parser.instantiate(cfg)
    names = [a.name for a in [init.algorithm, *init.compare_with]]
    if len(set(names)) != len(names):
        raise ValueError(f"algorithm names must differ (they name the subdirectories of run_dir): {names}")
    # one runner per algorithm, each with a fresh DataModule built from the config (the same partition)
    summaries = [FederatedRunner(parser, cfg, algorithm=i).run() for i in range(len(names))]
    table = comparison_table(summaries)
    atomic_write_text(Path(cfg.run_dir) / "comparison.md", table + "\n")
    atomic_write_text(Path(cfg.run_dir) / "comparison.csv", to_csv(summaries))
    print(table)
    return summaries


def table_main(run_dirs: list[str]) -> str:
    """Print the comparison table of finished runs (each directory: a run_dir or one algorithm's subdirectory)."""
    if not run_dirs:
        raise SystemExit("usage: lightning-methods-fed table RUN_DIR [RUN_DIR ...]")
    summaries = [s for d in run_dirs for s in load_summary(d)]
    table = comparison_table(summaries)
    print(table)
    return table


def run(args: list[str] | None = None) -> list[dict[str, Any]] | str:
    """:func:`main` for Python callers: returns the summaries of the runs (or the printed table of ``table``)."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] == "table":
        return table_main(args[1:])
    parser = build_parser()
    cfg = parser.parse_args(args)
    return run_config(cfg, parser)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-methods fed`` / ``lightning-methods-fed`` (see the module docstring). Returns
    nothing (a console script's return value becomes its exit status); use :func:`run` for the summaries."""
    run(args)


if __name__ == "__main__":  # pragma: no cover
    main()
