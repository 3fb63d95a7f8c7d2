"""Co-training with EMA teachers and mutual distillation: the learner of Early Cutting's selection rounds.

Yuan, Feng, Han, Liu, "Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy Examples" (NeurIPS
2025, arXiv 2502.08227; official code tmllab/2025_NeurIPS_MEE, ``main.py``). Two networks are trained side by side,
each with an exponential-moving-average copy. Each network minimizes

    CE(z_a, y) + w * T^2 * KL( (softmax(z_b / T) + softmax(z_b_ema / T)) / 2  ||  softmax(z_a / T) )

(``batchmean``; w = 0.5, T = 2), the target averaging the peer's and the peer-EMA's tempered probabilities without
gradient. Predictions, validation and test use the ensemble ``(z_1 + z_2 + z_1_ema + z_2_ema) / 4`` of logits.

Implementation notes (our choices, numerically equivalent to the official loop): the official code runs a no-grad
forward of each network for the peer targets and a second forward with gradient; both see the same weights and batch,
so one forward per network suffices here (the official BatchNorm running statistics are updated twice per step, here
once). Both losses are back-propagated together (their gradients do not interact: peer logits are detached) and each
network steps its own optimizer. Because there are two ``LightningOptimizer.step`` calls per batch,
``trainer.global_step`` counts 2 per batch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .classifier import SCALER_PRECISIONS, as_dict_batch
from .hparams import callable_from_config, checkpoint_safe
from .models import create_backbone
from .parameters import param_groups_by_role


def mutual_kd_loss(logits: torch.Tensor, target: torch.Tensor, peer_logits: torch.Tensor,
                   peer_ema_logits: torch.Tensor, temperature: float = 2.0, weight: float = 0.5
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, cross_entropy)`` of one network; the peer logits are treated as constants."""
    t = temperature
    logits = logits.float()
    with torch.no_grad():
        soft = (F.softmax(peer_logits.float() / t, -1) + F.softmax(peer_ema_logits.float() / t, -1)) / 2
    ce = F.cross_entropy(logits, target)
    kd = F.kl_div(F.log_softmax(logits / t, -1), soft, reduction="batchmean") * t * t
    return ce + weight * kd, ce


class EMAModel(nn.Module):
    """EMA copy of a network: ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every step; buffers
    (BatchNorm running statistics) are copied. It always *evaluates* in eval mode (running statistics), also while
    the surrounding module trains, and is never trained by gradient."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.module.training:
            return self.module(x)
        self.module.train(False)  # switched per call so the module tree reports train mode to Lightning
        try:
            return self.module(x)
        finally:
            self.module.train(True)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        ema = list(self.module.parameters())
        src = [p.detach() for p in model.parameters()]
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, src, alpha=1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy with re-initialized parameters (``reset_parameters`` of every submodule)."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return twin


class CoTrainingModule(LightningModule):
    """Two networks + two EMA copies with mutual distillation (see the module docstring).

    Args:
        backbone: backbone name for ``create_backbone`` (paper: ``resnet34`` on CIFAR-100, ``resnet18`` on CIFAR-10)
            or an ``nn.Module`` (the second network is a re-initialized copy).
        num_classes: number of classes (linked from the DataModule by the CLI).
        optimizer: callable ``params -> Optimizer``, called once per network with its role-tagged groups; ``None``:
            SGD(lr 0.1, momentum 0.9, weight decay 5e-4) as in the paper.
        lr_scheduler: callable ``optimizer -> LRScheduler``, one per network (paper: cosine, T_max 300, eta_min 1e-5).
        scheduler_interval: step the schedulers per ``"epoch"`` (in ``on_train_epoch_end``) or per ``"step"``.
        scheduler_monitor: metric passed to ``ReduceLROnPlateau.step``.
        ema_decay: EMA decay per optimizer step (0.999).
        kd_weight: weight ``w`` of the distillation term (0.5).
        temperature: distillation temperature ``T`` (2).
        no_weight_decay_roles: parameter roles ("norm", "bias", "weight") without weight decay (paper: none).
        channels_last: channels-last memory format for the networks and inputs.
        backbone_kwargs: extra keyword arguments for ``create_backbone``.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet34",
        num_classes: int = 100,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val/loss",
        ema_decay: float = 0.999,
        kd_weight: float = 0.5,
        temperature: float = 2.0,
        no_weight_decay_roles: list[str] | None = None,
        channels_last: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.automatic_optimization = False
        if not 0.0 <= ema_decay <= 1.0 or temperature <= 0 or kd_weight < 0:
            raise ValueError("need 0 <= ema_decay <= 1, temperature > 0 and kd_weight >= 0")
        if isinstance(backbone, nn.Module):
            self.net1, self.net2 = backbone, _fresh_copy(backbone)
        else:
            self.net1 = create_backbone(backbone, num_classes, **(backbone_kwargs or {}))
            self.net2 = create_backbone(backbone, num_classes, **(backbone_kwargs or {}))
        if channels_last:
            self.net1.to(memory_format=torch.channels_last)
            self.net2.to(memory_format=torch.channels_last)
        self.ema1, self.ema2 = EMAModel(self.net1), EMAModel(self.net2)
        self.num_classes = num_classes
        self.optimizer_factory = callable_from_config(optimizer)
        self.scheduler_factory = callable_from_config(lr_scheduler)
        metrics = MetricCollection({
            "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False),
            "acc_top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro",
                                           validate_args=False),
        })
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble logits ``(f1 + f2 + f1_ema + f2_ema) / 4``."""
        x = self._prep(x)
        return (self.net1(x).float() + self.net2(x).float() + self.ema1(x).float() + self.ema2(x).float()) / 4

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch = as_dict_batch(batch)
        x, y = self._prep(batch["image"]), batch["target"]
        opt1, opt2 = self.optimizers()
        with torch.no_grad():
            e1, e2 = self.ema1(x), self.ema2(x)
        z1, z2 = self.net1(x), self.net2(x)
        t, w = self.hparams.temperature, self.hparams.kd_weight
        loss1, _ = mutual_kd_loss(z1, y, z2.detach(), e2, t, w)
        loss2, _ = mutual_kd_loss(z2, y, z1.detach(), e1, t, w)
        opt1.zero_grad(set_to_none=True)
        opt2.zero_grad(set_to_none=True)
        self.manual_backward(loss1 + loss2)
        opt1.step()
        opt2.step()
        self.ema1.update(self.net1, self.hparams.ema_decay)
        self.ema2.update(self.net2, self.hparams.ema_decay)
        n = y.shape[0]
        self.train_metrics.update(((z1 + z2) / 2).detach(), y)
        loss = (loss1.detach() + loss2.detach()) / 2
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict({"train/loss_net1": loss1.detach(), "train/loss_net2": loss2.detach()}, on_step=False,
                      on_epoch=True, batch_size=n)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=n)
        if self.hparams.scheduler_interval == "step":
            self._step_schedulers()
        return loss

    def on_train_epoch_end(self) -> None:
        opt = self.optimizers()[0]
        self.log("train/lr", float(opt.optimizer.param_groups[0]["lr"]), on_epoch=True, batch_size=1)
        if self.hparams.scheduler_interval == "epoch":
            self._step_schedulers()

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        for sch in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers is not None else []:
            if isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = self.trainer.callback_metrics.get(self.hparams.scheduler_monitor)
                if metric is None:
                    raise KeyError(f"ReduceLROnPlateau needs {self.hparams.scheduler_monitor!r}, which was not logged;"
                                   " set model.init_args.scheduler_monitor")
                sch.step(metric)
            else:
                sch.step()

    # ------------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Any, metrics: MetricCollection, stage: str) -> None:
        batch = as_dict_batch(batch)
        logits = self(batch["image"])
        n = batch["target"].shape[0]
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["target"]), on_epoch=True, batch_size=n,
                 sync_dist=True)
        metrics.update(logits, batch["target"])
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=n)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        batch = as_dict_batch(batch)
        probs = torch.softmax(self(batch["image"]), dim=-1)
        conf, pred = probs.max(dim=-1)
        out = {"pred": pred, "confidence": conf, "probs": probs}
        out.update({k: batch[k] for k in ("index", "target") if isinstance(batch, Mapping) and k in batch})
        return out

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        roles = self.hparams.no_weight_decay_roles or ()
        optimizers, schedulers = [], []
        for net in (self.net1, self.net2):
            groups = param_groups_by_role(net, no_weight_decay_roles=roles)
            opt = (torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4) if self.optimizer_factory is None
                   else self.optimizer_factory(groups))
            optimizers.append(opt)
            if self.scheduler_factory is not None:
                schedulers.append({"scheduler": self.scheduler_factory(opt),
                                   "interval": self.hparams.scheduler_interval})
        return optimizers, schedulers

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # weights_only-loadable checkpoints: callables stored as {"class_path", "init_args"} (see hparams.py)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = checkpoint_safe(checkpoint["hyper_parameters"])

    def on_fit_start(self) -> None:
        if self.trainer.precision in SCALER_PRECISIONS:
            raise ValueError(
                "CoTrainingModule cannot run under precision='16-mixed': one GradScaler cannot serve two optimizers "
                "stepped from one backward pass. Use --trainer.precision bf16-mixed (Ampere or newer) or 32-true."
            )
