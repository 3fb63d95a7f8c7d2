"""``TunnelProbe``: per-layer linear probes and numerical rank of the backbone during and after training.

Masarczyk et al., *The Tunnel Effect: Building Data Representations in Deep Neural Networks*, NeurIPS 2023,
arXiv 2305.19753. At the end of ``fit`` (and every ``every_n_epochs`` epochs, for the "tunnel forms early"
analysis) the callback probes every layer of ``pl_module.backbone`` (see ``lightning_methods.tunnel``) on the
DataModule's training and test sets, optionally on an OOD class subset of a second DataModule, and writes

- ``tunnel_epochXXX.csv`` / ``.json`` per probe, ``tunnel.csv`` / ``tunnel.json`` / ``tunnel.png`` at fit end
  (accuracy and rank vs layer, tunnel shaded), and with two or more probes ``tunnel_history.csv`` and
  ``tunnel_formation.png`` (layer x epoch), into ``output_dir`` (default: ``<run dir>/tunnel``);
- the table, the tunnel start and the plots into every ``WandbLogger`` of the trainer.

The probe runs in eval mode without gradients and without augmentation and restores every module's train/eval flag:
parameters and BatchNorm running statistics are unchanged. The periodic probe runs right after the epoch's
validation (before ``ModelCheckpoint`` saves), so its history is part of every checkpoint and survives a resume.
Under DDP all ranks take part and end with the same table (features gathered by sample index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_methods.tunnel.data import class_subset, datamodule_data, image_preparer
from lightning_methods.tunnel.probe import TunnelProber
from lightning_methods.tunnel.report import TunnelReport, history_csv, wandb_log
from lightning_methods.tunnel.settings import ProbeSettings
from lightning_methods.utils import atomic_write_text, barrier


class TunnelProbe(Callback):
    """Probe every layer of the backbone at fit end and every ``every_n_epochs`` epochs.

    Args:
        settings: what is probed and how (:class:`lightning_methods.tunnel.ProbeSettings`: points, sample counts,
            feature storage, linear-probe solver, rank, tunnel threshold, OOD classes, seed, memory limits); in YAML a
            mapping under ``settings:``. Default: ``ProbeSettings()``.
        every_n_epochs: probe after every n-th training epoch too (0: only at fit end).
        at_fit_end: probe at the end of ``fit`` (reuses the periodic probe of the last epoch when there is one).
        ood_data: a DataModule whose classes give the OOD probe (e.g. CIFAR-100 for a CIFAR-10 model), or None
            (the class subset is ``settings.ood_classes``).
        output_dir: where the CSV / JSON / PNG files go (default: ``<run dir>/tunnel``).
        log_wandb: log tables and plots into the trainer's ``WandbLogger``s.
        module_attr: attribute of the LightningModule holding the network to probe (default ``"backbone"``; the module
            itself when absent or None).

    Raises:
        MemoryError: at fit start, when the features would exceed ``memory_budget_gb`` (with the options).
        ValueError: unknown probe points, or ``ood_classes`` larger than the OOD dataset's classes.
    """

    def __init__(
        self,
        settings: ProbeSettings | None = None,
        every_n_epochs: int = 0,
        at_fit_end: bool = True,
        ood_data: LightningDataModule | None = None,
        output_dir: str | None = None,
        log_wandb: bool = True,
        module_attr: str | None = "backbone",
    ) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        if settings is not None and not isinstance(settings, ProbeSettings):
            raise TypeError(f"settings must be a ProbeSettings, got {type(settings).__name__}")
        self.settings = settings if settings is not None else ProbeSettings()
        self.every_n_epochs, self.at_fit_end = every_n_epochs, at_fit_end
        self.ood_datamodule, self.output_dir, self.log_wandb = ood_data, output_dir, log_wandb
        self.module_attr = module_attr
        self.prober = TunnelProber(self.settings)
        self.history: list[dict[str, Any]] = []  # {"epoch", "global_step", "report"} of every probe, in order
        self._ood = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.ood_datamodule is None:
            return
        if trainer.is_global_zero:
            self.ood_datamodule.prepare_data()
        barrier()
        self._ood = class_subset(datamodule_data(self.ood_datamodule), self.settings.ood_classes, self.settings.seed)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        backbone = self._backbone(pl_module)
        points = self.prober.points(backbone)  # unknown names fail now, not after training
        self.prober.check_memory(
            backbone,
            points,
            self._id_data(trainer),
            ood_data=self._ood,
            prepare=self._prepare(trainer, pl_module),
            forward=self._forward(pl_module),
        )

    # ------------------------------------------------------------------------------------------------ hooks
    def _due(self, trainer: Trainer) -> bool:
        n = self.every_n_epochs
        fitting = trainer.state.fn == TrainerFn.FITTING  # not during a standalone validate()
        return n > 0 and fitting and not trainer.sanity_checking and (trainer.current_epoch + 1) % n == 0

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due(trainer) and trainer.is_last_batch:
            self._probe(trainer, pl_module, trainer.current_epoch + 1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due(trainer):  # no validation this epoch: probe here (skipped when done after validation)
            self._probe(trainer, pl_module, trainer.current_epoch + 1)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_fit_end:
            if self.history:
                self._write_final(trainer)
            return
        self._probe(trainer, pl_module, trainer.current_epoch)
        self._write_final(trainer)

    # ------------------------------------------------------------------------------------------------ work
    def _backbone(self, pl_module: LightningModule) -> nn.Module:
        if self.module_attr and hasattr(pl_module, self.module_attr):
            return getattr(pl_module, self.module_attr)
        return pl_module

    def _forward(self, pl_module: LightningModule):
        from lightning_methods.analysis.attention_extract import eager

        run = eager(self._backbone(pl_module))
        if getattr(pl_module, "channels_last", False):
            return lambda x: run(x.contiguous(memory_format=torch.channels_last))
        return run

    @staticmethod
    def _id_data(trainer: Trainer):
        if trainer.datamodule is None:
            raise TypeError("TunnelProbe reads the train and test sets of the trainer's DataModule; fit with a "
                            "DataModule of lightning_methods.datamodules")
        return datamodule_data(trainer.datamodule)

    @staticmethod
    def _prepare(trainer: Trainer, pl_module: LightningModule):
        dm = trainer.datamodule
        return image_preparer(dm, pl_module.device)

    def _probe(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> TunnelReport:
        step = trainer.global_step
        if self.history and self.history[-1]["global_step"] == step:
            return TunnelReport.from_dict(self.history[-1]["report"])
        meta = {"epoch": epoch, "global_step": step, "backbone": type(self._backbone(pl_module)).__name__,
                "train_augment": getattr(trainer.datamodule, "augment", None)}
        # validation hooks run under inference mode: the probes need autograd
        with torch.inference_mode(False), torch.enable_grad():
            report = self.prober.run(
                self._backbone(pl_module),
                self._id_data(trainer),
                self._prepare(trainer, pl_module),
                ood_data=self._ood,
                device=pl_module.device,
                forward=self._forward(pl_module),
                context=trainer.precision_plugin.forward_context,
                meta=meta,
            )
        self.history.append({"epoch": epoch, "global_step": step, "report": report.to_dict()})
        out = self._dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            report.save(out, f"tunnel_epoch{epoch:03d}")
            self._wandb(trainer, report, step)
        return report

    def _dir(self, trainer: Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath).parent / "tunnel"
        return Path(trainer.log_dir or trainer.default_root_dir) / "tunnel"

    def _wandb(self, trainer: Trainer, report: TunnelReport, step: int, images: dict | None = None) -> None:
        if not self.log_wandb:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                wandb_log(logger.experiment, report, step, images)

    def _write_final(self, trainer: Trainer) -> None:
        out = self._dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if not trainer.is_global_zero or not self.history:
            return
        from lightning_methods.tunnel.plots import plot_formation, plot_report

        report = TunnelReport.from_dict(self.history[-1]["report"])
        report.save(out, "tunnel")
        images = {"plot": plot_report(report, out / "tunnel.png", self._title(trainer, report))}
        if len(self.history) > 1:
            atomic_write_text(out / "tunnel_history.csv", history_csv(self.history))
            images["formation"] = plot_formation(self.history, out / "tunnel_formation.png")
        self._wandb(trainer, report, trainer.global_step, images)

    def _title(self, trainer: Trainer, report: TunnelReport) -> str:
        s = report.summary
        recipe = f"train augment={s.get('train_augment')}, pool={self.settings.pool_size}"
        return (f"{s.get('backbone')} on {s.get('id_data')} ({recipe}), epoch {s.get('epoch')}: tunnel from layer "
                f"{s.get('tunnel_start_layer')}")

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
