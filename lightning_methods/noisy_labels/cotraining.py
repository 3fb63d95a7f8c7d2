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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.classifier import SCALER_PRECISIONS, ImageClassifier, as_dict_batch
from lightning_methods.models import create_backbone
from lightning_methods.parameters import param_groups_by_role


def mutual_kd_loss(logits: torch.Tensor, target: torch.Tensor, peer_logits: torch.Tensor,
                   peer_ema_logits: torch.Tensor, temperature: float = 2.0, weight: float = 0.5,
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, cross_entropy)`` of one network; the peer logits are treated as constants (label smoothing applies
    to the cross-entropy only; the paper uses none)."""
    t = temperature
    logits = logits.float()
    with torch.no_grad():
        soft = (F.softmax(peer_logits.float() / t, -1) + F.softmax(peer_ema_logits.float() / t, -1)) / 2
    ce = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
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


class CoTrainingClassifier(ImageClassifier):
    """Two networks + two EMA copies with mutual distillation (see the module docstring). ``backbone`` is the first
    network (also available as ``net1``); evaluation, prediction, scheduler stepping and checkpoint handling are
    ImageClassifier's, with the 4-model ensemble as ``forward``.

    Args:
        backbone: backbone name for ``create_backbone`` (paper: ``resnet34`` on CIFAR-100, ``resnet18`` on CIFAR-10)
            or an ``nn.Module`` (the second network is a re-initialized copy).
        ema_decay: EMA decay per optimizer step (0.999).
        kd_weight: weight ``w`` of the distillation term (0.5).
        temperature: distillation temperature ``T`` (2).
        **kwargs: every argument of :class:`ImageClassifier`, by keyword. ``optimizer`` is called once per network
            with its role-tagged groups (``None``: SGD lr 0.1, momentum 0.9, weight decay 5e-4 as in the paper);
            ``lr_scheduler`` gives one scheduler per network (paper: cosine, T_max 300, eta_min 1e-5);
            ``label_smoothing`` applies to both networks' cross-entropy; ``grad_clip_norm`` clips each network's
            gradient norm; ``compile`` compiles both networks; ``bn_bypass_second_pass`` has no effect (one pass
            per step).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet34",
        ema_decay: float = 0.999,
        kd_weight: float = 0.5,
        temperature: float = 2.0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= ema_decay <= 1.0 or temperature <= 0 or kd_weight < 0:
            raise ValueError("need 0 <= ema_decay <= 1, temperature > 0 and kd_weight >= 0, got "
                             f"ema_decay={ema_decay}, temperature={temperature}, kd_weight={kd_weight}")
        super().__init__(backbone=backbone, **kwargs)
        num_classes, channels_last, backbone_kwargs = self.num_classes, self.channels_last, self.backbone_kwargs
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if isinstance(backbone, nn.Module):
            self.net2 = _fresh_copy(backbone)
        else:
            self.net2 = create_backbone(backbone, num_classes, **(backbone_kwargs or {}))
        if channels_last:
            self.net2.to(memory_format=torch.channels_last)
        self.ema1, self.ema2 = EMAModel(self.net1), EMAModel(self.net2)

    def configure_model(self) -> None:
        if self.compile_backbone and not getattr(self, "_compiled", False):
            self.net2.compile()
        super().configure_model()  # compiles net1 (the backbone) and marks the module compiled

    @property
    def net1(self) -> nn.Module:
        return self.backbone

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

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
        t, w, ls = self.hparams.temperature, self.hparams.kd_weight, self.label_smoothing
        loss1, _ = mutual_kd_loss(z1, y, z2.detach(), e2, temperature=t, weight=w, label_smoothing=ls)
        loss2, _ = mutual_kd_loss(z2, y, z1.detach(), e1, temperature=t, weight=w, label_smoothing=ls)
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
        if self.scheduler_interval == "step":
            self._step_schedulers()
        return loss

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        roles = self.no_weight_decay_roles
        optimizers, schedulers = [], []
        for net in (self.net1, self.net2):
            groups = param_groups_by_role(net, no_weight_decay_roles=roles)
            opt = self.make_optimizer(groups)
            optimizers.append(opt)
            if self.scheduler_factory is not None:
                schedulers.append({"scheduler": self.scheduler_factory(opt),
                                   "interval": self.hparams.scheduler_interval})
        return optimizers, schedulers

    def on_fit_start(self) -> None:
        if self.trainer.precision in SCALER_PRECISIONS:
            raise ValueError(
                "CoTrainingClassifier cannot run under precision='16-mixed': one GradScaler cannot serve two "
                "optimizers stepped from one backward pass. Use --trainer.precision bf16-mixed (Ampere or newer) or "
                "32-true."
            )
