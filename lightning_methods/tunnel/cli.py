"""Tunnel Effect: layer-wise linear probes and numerical rank of a checkpoint, with the tunnel start and OOD probe.

Masarczyk et al., *The Tunnel Effect: Building Data Representations in Deep Neural Networks*, NeurIPS 2023,
arXiv 2305.19753.

    lightning-methods probe --ckpt runs/.../last.ckpt --data CIFAR10DataModule --data.data_dir data \\
        --ood_data CIFAR100DataModule --ood_data.data_dir data --probe.ood_classes 10
    lightning-methods probe --ckpt last.ckpt --data CIFAR10DataModule --list_points true   # the layers only

``--ckpt`` takes any checkpoint of the package whose module has a ``backbone`` (ImageClassifier and its
subclasses; the backbone name, ``num_classes`` and ``backbone_kwargs`` come from its hyperparameters), or a plain
backbone state dict with ``--backbone NAME --num_classes N``. Files are loaded with ``weights_only=True``.
``--data`` is the in-distribution DataModule (its train and test sets; no augmentation), ``--ood_data`` an optional
second one whose seeded class subset (``--probe.ood_classes``) gives the OOD probe. Every ``--probe.*`` setting is a
field of :class:`lightning_methods.tunnel.ProbeSettings`. Writes ``tunnel.csv``, ``tunnel.json`` and ``tunnel.png``
to ``--output_dir`` (default: ``<checkpoint folder>/tunnel_<checkpoint name>``) and, unless ``--wandb_mode
disabled``, a W&B run with the table and the plot. Under ``torchrun`` every process takes part (features gathered by
sample index). The W&B run's local files go into the output folder. ``--config FILE`` reads the same options from
YAML.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import LightningDataModule
from torch import nn

import lightning_methods.datamodules  # noqa: F401  (short class names for --data)
from lightning_methods.distillation.teacher import extract_state_dict
from lightning_methods.models import create_backbone
from lightning_methods.tunnel.data import class_subset, datamodule_data, image_preparer
from lightning_methods.tunnel.probe import TunnelProber
from lightning_methods.tunnel.report import TunnelReport, wandb_log
from lightning_methods.tunnel.settings import ProbeSettings
from lightning_methods.utils import get_rank, leave_process_group, safe_torch_load


def _import_datamodules() -> None:
    """Import every public DataModule: ``lightning_methods.datamodules`` is lazy, and jsonargparse resolves a short
    class name (``--data CIFAR10DataModule``) only among the subclasses already imported."""
    import lightning_methods.datamodules as datamodules

    for name in datamodules.__all__:
        getattr(datamodules, name)


def build_parser() -> ArgumentParser:
    """The argument parser of ``lightning-methods probe``."""
    _import_datamodules()
    parser = ArgumentParser(prog="lightning-methods probe", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML/JSON file with these options.")
    parser.add_argument("--ckpt", type=str, required=True, help="Checkpoint (.ckpt of the package) or state dict.")
    parser.add_argument("--backbone", type=str | None, default=None,
                        help="Backbone name (default: from the checkpoint's hyperparameters; needed for state dicts).")
    parser.add_argument("--num_classes", type=int | None, default=None, help="Output classes of the backbone.")
    parser.add_argument("--backbone_kwargs", type=dict | None, default=None, help="Extra create_backbone arguments.")
    parser.add_subclass_arguments(LightningDataModule, "data", required=False,
                                  help="In-distribution DataModule (train and test sets are probed).")
    parser.add_subclass_arguments(LightningDataModule, "ood_data", required=False,
                                  help="DataModule of the OOD probe (a seeded class subset, --probe.ood_classes).")
    parser.add_class_arguments(ProbeSettings, "probe")
    parser.add_argument("--output_dir", type=str | None, default=None, help="Where tunnel.csv/json/png are written.")
    parser.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    parser.add_argument("--precision", type=Literal["32-true", "bf16-mixed", "16-mixed"], default="32-true",
                        help="Autocast of the feature-extraction passes.")
    parser.add_argument("--list_points", type=bool, default=False, help="Print the probe points and exit.")
    parser.add_argument("--wandb_project", type=str, default="lightning-methods", help="W&B project.")
    parser.add_argument("--wandb_name", type=str | None, default=None, help="W&B run name.")
    parser.add_argument("--wandb_mode", type=Literal["online", "offline", "disabled"] | None, default=None,
                        help="W&B mode (default: W&B's own setting, e.g. WANDB_MODE).")
    return parser


def load_backbone(path: str | Path, backbone: str | None = None, num_classes: int | None = None,
                  backbone_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone stored in a package checkpoint (or a state dict), loaded strictly with ``weights_only=True``.

    Returns:
        ``(backbone in eval mode, info)`` with the backbone name, classes and the checkpoint's epoch/step.

    Raises:
        FileNotFoundError: no such file. ValueError: the architecture is unknown or does not fit the weights.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass --ckpt with a .ckpt of the package (e.g. "
                                "<run>/checkpoints/last.ckpt) or a state dict with --backbone and --num_classes")
    obj = safe_torch_load(path, map_location="cpu", what="checkpoint")
    hp = dict(obj.get("hyper_parameters") or {}) if isinstance(obj, dict) else {}
    name = backbone or hp.get("backbone")
    classes = num_classes or hp.get("num_classes")
    if not isinstance(name, str) or classes is None:
        raise ValueError(f"{path} does not say which backbone it holds (hyperparameters backbone="
                         f"{hp.get('backbone')!r}, num_classes={hp.get('num_classes')!r}); pass --backbone NAME and "
                         "--num_classes N")
    kwargs = backbone_kwargs if backbone_kwargs is not None else dict(hp.get("backbone_kwargs") or {})
    model = create_backbone(name, int(classes), **kwargs)
    sd = extract_state_dict(obj, str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit backbone {name!r} with {classes} classes and {kwargs}: missing "
                         f"{list(missing)[:4]}, unexpected {list(unexpected)[:4]}; check --backbone / --num_classes / "
                         "--backbone_kwargs")
    info = {"checkpoint": str(path), "backbone": name, "num_classes": int(classes), "backbone_kwargs": kwargs,
            "epoch": obj.get("epoch") if isinstance(obj, dict) else None,
            "global_step": obj.get("global_step") if isinstance(obj, dict) else None}
    return model.eval(), info


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def _autocast(precision: str, device: torch.device):
    if precision == "32-true":
        return None
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _init_distributed(device: torch.device) -> bool:
    """Join a process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def run_probe_command(args: list[str] | None = None) -> TunnelReport | None:
    """Parse ``args``, probe the checkpoint and write the results; returns the report (None for --list_points)."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    init = parser.instantiate_classes(cfg)
    device = _device(cfg.device)
    backbone, info = load_backbone(cfg.ckpt, cfg.backbone, cfg.num_classes, cfg.backbone_kwargs)
    backbone.to(device)
    prober = TunnelProber(init.probe)
    points = prober.points(backbone)
    if cfg.list_points:
        for i, p in enumerate(points, 1):
            print(f"{i:3d}  {p.name:20s} {p.module}{':' + p.activation if p.activation else ''}")
        return None
    if init.data is None:
        parser.error("--data is required: the in-distribution DataModule, e.g. --data CIFAR10DataModule "
                     "--data.data_dir DIR")
    started = _init_distributed(device)
    try:
        dm = init.data
        if get_rank() == 0:
            dm.prepare_data()
        id_data = datamodule_data(dm)
        ood = None
        if init.ood_data is not None:
            if get_rank() == 0:
                init.ood_data.prepare_data()
            ood = class_subset(datamodule_data(init.ood_data), init.probe.ood_classes, init.probe.seed)
        meta = {**info, "train_augment": "see the training config", "title": f"{info['backbone']} ({cfg.ckpt})"}
        prepare = image_preparer(dm, device)
        report = prober.run(backbone, id_data, prepare, ood, device, context=_autocast(cfg.precision, device),
                            meta=meta, points=points)
        if get_rank() == 0:
            _write(cfg, report)
        return report
    finally:
        if started:
            leave_process_group()


def _write(cfg: Any, report: TunnelReport) -> None:
    from lightning_methods.tunnel.plots import plot_report

    ckpt = Path(cfg.ckpt)
    out = Path(cfg.output_dir) if cfg.output_dir else ckpt.parent / f"tunnel_{ckpt.stem}"
    paths = report.save(out, "tunnel")
    png = plot_report(report, out / "tunnel.png")
    print(report.to_csv())
    print(report.describe())
    print(f"wrote {paths['csv']}, {paths['json']}, {png}")
    if cfg.wandb_mode == "disabled":
        return
    import wandb

    from lightning_methods.runs import new_wandb_id

    run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name, mode=cfg.wandb_mode, job_type="tunnel-probe",
                     id=new_wandb_id(), dir=str(out.resolve()),
                     config={"ckpt": str(ckpt), "probe": dict(vars(cfg.probe)), "data": str(cfg.data.class_path)})
    with contextlib.ExitStack() as stack:
        stack.callback(run.finish)
        wandb_log(run, report, images={"plot": png})


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-methods probe`` / ``lightning-methods-probe``."""
    run_probe_command(args)


if __name__ == "__main__":  # pragma: no cover
    main()
