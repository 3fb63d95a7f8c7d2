"""``lightning-methods-select``: run the whole multi-round Early Cutting procedure from one config.

Yuan et al., "Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy Examples", arXiv 2502.08227.

    lightning-methods-select --config configs/noisy_labels/cifar100_sym40.yaml --data.init_args.data_dir DIR

The config has the sections of a ``lightning-methods fit`` config (``trainer``, ``model``, ``data``, each
LightningCLI-style with ``class_path`` / ``init_args``) plus ``selection`` (see :class:`SelectionConfig`),
``run_dir``, ``resume`` and ``stop_after_round``. ``--help``, ``--print_config`` and dotted overrides work as in
LightningCLI. Running the same command again resumes: finished rounds are skipped, an interrupted round continues from
its last checkpoint. For several GPUs use ``trainer.devices`` / ``trainer.strategy: ddp`` (every process runs the
driver; rank 0 writes the files) or launch with ``torchrun``.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import ActionConfigFile
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser

from lightning_methods.callbacks.nonfinite_guard import NonFiniteGuard
from lightning_methods.cli import default_precision, import_public_classes
from lightning_methods.noisy_labels.config import SelectionConfig
from lightning_methods.noisy_labels.runner import EarlyCuttingRunner
from lightning_methods.utils.wandb import finish_open_run


def build_parser() -> LightningArgumentParser:
    """The argument parser of ``lightning-methods-select``."""
    import_public_classes()  # short class names in the config resolve
    parser = LightningArgumentParser(prog="lightning-methods select",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file (YAML/JSON).")
    parser.add_argument("--seed_everything", type=int, default=1,
                        help="Seed; round r is seeded with seed_everything + r (the noise and split use data.seed).")
    parser.add_argument("--run_dir", type=str, default="runs/early_cutting",
                        help="Directory of the run: per-round checkpoints, selections, statistics, state.json.")
    parser.add_argument("--resume", type=bool, default=True,
                        help="Continue the run found in run_dir (finished rounds are not recomputed).")
    parser.add_argument("--stop_after_round", type=int | None, default=None,
                        help="Stop after this selection round has finished (e.g. to split a long run into jobs).")
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    parser.add_class_arguments(SelectionConfig, "selection")
    parser.add_lightning_class_args(NonFiniteGuard, "nonfinite_guard")  # stops a diverged round (issue 18)
    parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
    parser.set_defaults({"trainer.precision": default_precision()})
    return parser


def run_select(args: list[str] | None = None) -> dict[str, Any]:
    """Parse ``args`` (default: the command line), run or resume the procedure and return its summary."""
    parser = build_parser()
    config = parser.parse_args(args)
    try:
        return EarlyCuttingRunner(parser, config).run()
    except BaseException:
        finish_open_run(exit_code=1)  # an interrupted round must not leave its W&B run open
        raise


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-methods-select`` console script."""
    run_select(args)


if __name__ == "__main__":  # pragma: no cover
    main()
