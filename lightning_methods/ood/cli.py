"""EncMin2L OOD pipeline: embed, fit RDMs, score, calibrate, fuse and report (``lightning-methods-ood``).

Bhuyan, "Tippett-minimum Fusion of Representation-space Diffusion Models for Multi-Encoder Out-of-Distribution
Detection", arXiv 2605.20502.

    lightning-methods-ood --config configs/ood/cifar100_encmin2l.yaml
    lightning-methods-ood --config configs/ood/digits_demo.yaml --run_dir /tmp/ood_demo     # offline demo

The config sections are ``id``, ``ood``, ``encoders``, ``variants``, ``pca_dim``, ``rdm``, ``fusion``,
``diagnostics``, ``baselines``, ``embed`` and a LightningCLI-style ``trainer`` (with its W&B ``logger``); see
docs/methods/ood.md. Running the same command again runs only the stages still missing (an interrupted RDM fit resumes
from its ``last.ckpt``); the run directory refuses a changed configuration. ``--help``, ``--print_config`` and dotted
overrides work as in LightningCLI. Several GPUs: ``torchrun --nproc_per_node N -m lightning_methods.ood.cli --config
... --trainer.devices N --trainer.strategy ddp`` (rank 0 writes the files).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from lightning_methods.cli import default_precision, import_public_classes
from lightning_methods.ood.config import SECTIONS, OODSetConfig
from lightning_methods.ood.encoders import EncoderSpec
from lightning_methods.ood.features import Variant
from lightning_methods.utils import get_rank
from lightning_methods.utils.wandb import finish_open_run


def build_parser() -> LightningArgumentParser:
    """The argument parser of ``lightning-methods-ood``."""
    import_public_classes()  # short class names (``class_path: DigitsDataModule``) resolve like in `fit`
    parser = LightningArgumentParser(prog="lightning-methods ood",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file (YAML/JSON).")
    parser.add_argument("--run_dir", type=str, default="runs/ood", help="Directory of the run (state, RDMs, report).")
    parser.add_argument("--resume", type=bool, default=True, help="Continue the run found in run_dir.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of splits, initialisation and probes.")
    parser.add_argument("--cache_dir", type=str | None, default=None,
                        help="Embedding cache directory (default: run_dir/features); share it between runs.")
    parser.add_argument("--cache_policy", type=Literal["reuse", "require", "refresh"], default="reuse",
                        help="reuse valid cached features / require them (fail otherwise) / always recompute (also "
                             "replaces a cache entry or stage output whose checksum does not match).")
    parser.add_argument("--progress", type=bool, default=True,
                        help="Stage start / finish lines, epoch lines of the fits, batch lines of embedding and "
                             "scoring.")
    parser.add_argument("--stop_after", type=Literal["embed", "score"] | None, default=None,
                        help="Stop after this stage (to split a long run into jobs).")
    parser.add_class_arguments(SECTIONS["id"], "id")
    parser.add_argument("--ood", type=list[OODSetConfig], default=[], help="The OOD evaluation sets.")
    parser.add_argument("--encoders", type=list[EncoderSpec], default=[], help="The frozen encoders.")
    parser.add_argument("--variants", type=list[Variant], default=["raw", "standardize", "l2"],
                        help="Normalisation variants per encoder (the level-1 minimum runs over them).")
    parser.add_argument("--pca_dim", type=int | None, default=768, help="PCA dimension (applied when wider).")
    for name in ("rdm", "fusion", "diagnostics", "baselines", "embed"):
        parser.add_class_arguments(SECTIONS[name], name)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.set_defaults({"trainer.precision": default_precision(), "trainer.logger": False,
                         "trainer.enable_model_summary": False})
    return parser


def _init_distributed() -> None:
    """Under torchrun, join the process group before the first stage, so every rank runs every stage together."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def run_ood(args: list[str] | None = None) -> dict[str, Any]:
    """Parse ``args`` (default: the command line), run or resume the pipeline, return its result."""
    from lightning_methods.ood.pipeline import EncMin2LPipeline

    parser = build_parser()
    config = parser.parse_args(args)
    _init_distributed()
    try:
        result = EncMin2LPipeline(parser, config).run()
    except BaseException:
        finish_open_run(exit_code=1)
        raise
    if get_rank() == 0:
        if result.get("table"):
            print(result["table"], flush=True)
        print(f"[ood] {result.get('status')}: {config.run_dir}", flush=True)
    return result


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-methods ood`` / ``lightning-methods-ood``."""
    run_ood(args)


if __name__ == "__main__":  # pragma: no cover
    main()
