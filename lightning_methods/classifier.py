"""ImageClassifier: the LightningModule every classification method of lightning-methods builds on.

It trains with manual optimization under the package's *closure contract* (see ARCHITECTURE.md): each training step
builds a closure that runs the forward pass, ``manual_backward(per_sample_loss.mean())`` and returns the detached
per-sample loss vector, and calls ``optimizer.step(closure)`` through the LightningOptimizer. Plain optimizers call
the closure once; two-pass optimizers (SAM family) call it twice, and every call after the first within one step
runs with BatchNorm running statistics frozen; loss-adaptive optimizers (KOALA family) read the returned vector.
Training metrics and the logged loss come from the first call.

Parameter groups are tagged with roles (``lightning_methods.parameters``) so SAM-ON, ASAM and weight-decay
exclusions select parameters by module type, never by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_methods.hparams import checkpoint_safe, recorded_factory
from lightning_methods.models import create_backbone
from lightning_methods.parameters import frozen_bn_stats, param_groups_by_role

#: Precision settings under which a GradScaler drives the optimizer step.
SCALER_PRECISIONS = ("16-mixed", "16", 16)


def as_dict_batch(batch: Any) -> dict[str, torch.Tensor]:
    """Accept the package's dict batches and plain ``(image, target)`` tuples from other projects."""
    if isinstance(batch, Mapping):
        return batch  # type: ignore[return-value]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return {"image": batch[0], "target": batch[1]}
    raise TypeError(
        "ImageClassifier expects dict batches {'image', 'target', ...} or (image, target) tuples, got "
        f"{type(batch).__name__}"
    )


def soft_cross_entropy(logits: torch.Tensor, soft_target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy against a probability vector (CutMix / MixUp targets), with label smoothing."""
    if label_smoothing > 0:
        soft_target = soft_target * (1.0 - label_smoothing) + label_smoothing / soft_target.shape[-1]
    return -(soft_target * F.log_softmax(logits, dim=-1)).sum(-1)


class StepClosure:
    """The closure of one optimizer step (the closure contract): each call runs ``run(closure, call)``, ``call`` being
    the index of this evaluation within the step; ``calls`` counts them and ``first_loss`` (with whatever else ``run``
    records on the closure) holds what the first one produced.

    A callable object rather than a function that reads its own attributes: such a function refers to itself through
    its closure cell, a reference cycle that kept each step's batch - and its activations' inputs - alive until the
    cyclic garbage collector ran, several steps later (issue 23: in a CPU fit no batch memory could be reused)."""

    def __init__(self, run: Any) -> None:
        self.run, self.calls, self.first_loss = run, 0, None

    def __call__(self) -> torch.Tensor:
        call = self.calls
        self.calls += 1
        return self.run(self, call)


class ImageClassifier(LightningModule):
    """Image classification with injected optimizer and scheduler.

    Args:
        backbone: a name for ``lightning_methods.models.create_backbone`` or a ready ``nn.Module`` returning logits.
        num_classes: number of classes (linked from the DataModule by the CLI).
        optimizer: callable ``params -> Optimizer``; receives role-tagged parameter groups. ``None`` means
            SGD(lr=0.1, momentum=0.9, weight_decay=5e-4), the CIFAR baseline.
        lr_scheduler: callable ``optimizer -> LRScheduler`` or ``None``.
        scheduler_interval: step the scheduler every ``"epoch"`` or every optimizer ``"step"``.
        scheduler_monitor: metric passed to ``ReduceLROnPlateau.step``.
        label_smoothing: label smoothing of the training cross-entropy.
        no_weight_decay_roles: parameter roles ("norm", "bias", "weight") whose groups get weight_decay 0.
        grad_clip_norm: clip the global gradient norm after every backward pass (manual optimization makes
            ``Trainer(gradient_clip_val=...)`` unavailable); ``None`` disables it.
        channels_last: convert the backbone and inputs to channels-last memory format.
        compile: compile the backbone with ``torch.compile`` (keeps parameter names unchanged).
        backbone_kwargs: extra keyword arguments for ``create_backbone``.
        bn_bypass_second_pass: freeze BatchNorm running statistics in every closure call after the first of a step
            (SAM's descent pass), so they are updated once per batch. ``False`` reproduces the official ASAM and
            SAM-ON scripts, which update them in both passes.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        num_classes: int = 100,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val/loss",
        label_smoothing: float = 0.0,
        no_weight_decay_roles: list[str] | None = None,
        grad_clip_norm: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        bn_bypass_second_pass: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.automatic_optimization = False
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if scheduler_interval not in ("epoch", "step"):  # any other value would never step the scheduler
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.backbone_kwargs = dict(backbone_kwargs or {})
        if not isinstance(backbone, nn.Module):
            backbone = create_backbone(backbone, num_classes, **self.backbone_kwargs)
        self.backbone = backbone
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.num_classes = num_classes
        # load_from_checkpoint hands back the {"class_path", "init_args"} form stored by on_save_checkpoint
        self.optimizer_factory = recorded_factory(optimizer, "optimizer")
        self.scheduler_factory = recorded_factory(lr_scheduler, "lr_scheduler")
        self.closure_call = 0  # index of the current closure evaluation within one optimizer step
        # settings read during training live in attributes, so subclasses may re-save their own hparams
        self.label_smoothing, self.grad_clip_norm, self.channels_last = label_smoothing, grad_clip_norm, channels_last
        self.compile_backbone, self.bn_bypass_second_pass = compile, bn_bypass_second_pass
        self.scheduler_interval, self.scheduler_monitor = scheduler_interval, scheduler_monitor
        self.no_weight_decay_roles = list(no_weight_decay_roles or ())
        metrics = self.make_metrics()
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def make_metrics(self) -> MetricCollection:
        """The metrics of every stage (cloned with the prefixes ``train/``, ``val/``, ``test/``): top-1 and top-5
        accuracy. Regression modules override this hook (``HPNRegressor``)."""
        k = self.num_classes
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(k, top_k=1, average="micro", validate_args=False),
                "acc_top5": MulticlassAccuracy(k, top_k=min(5, k), average="micro", validate_args=False),
            }
        )

    # ----------------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.compile_backbone and not getattr(self, "_compiled", False):
            self.backbone.compile()
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    # ----------------------------------------------------------------------------------------------- losses
    def per_sample_loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Training loss of every sample (fp32), from ``soft_target`` when the batch has one."""
        logits = logits.float()
        ls = self.label_smoothing
        if "soft_target" in batch:
            return soft_cross_entropy(logits, batch["soft_target"].float(), ls)
        return F.cross_entropy(logits, batch["target"], reduction="none", label_smoothing=ls)

    def forward_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward pass of one training closure call: returns ``(per_sample_loss, logits)``.

        Methods override this to add terms (distillation) while keeping the closure contract.
        ``self.closure_call`` tells which call of the current step this is (0 = first).
        """
        logits = self(batch["image"])
        return self.per_sample_loss(logits, batch), logits

    # ----------------------------------------------------------------------------------------------- training
    def closure_call_context(self, optimizer: Any, call: int) -> contextlib.ExitStack:
        """Where one closure call runs its forward and backward passes: calls after the first of a step with
        BatchNorm running statistics frozen (``bn_bypass_second_pass``); the call an optimizer marks
        ``pass1_local`` (SAM's ``m_sharpness``) without DDP's gradient all-reduce (``no_sync``)."""
        stack = contextlib.ExitStack()
        if call > 0 and self.bn_bypass_second_pass:
            stack.enter_context(frozen_bn_stats(self))
        if getattr(getattr(optimizer, "optimizer", optimizer), "pass1_local", False):
            wrapped = self._trainer.strategy.model if self._trainer is not None else None
            if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(wrapped.no_sync())
            elif self._trainer is not None and self._trainer.world_size > 1:
                stack.close()
                raise RuntimeError(
                    f"m_sharpness (a rank-local SAM ascent) needs the ddp strategy, whose no_sync() skips the gradient "
                    f"all-reduce; the strategy is {type(self._trainer.strategy).__name__}: use --trainer.strategy ddp "
                    "or m_sharpness false")
        return stack

    def make_closure(self, batch: Mapping[str, torch.Tensor], optimizer: Any) -> StepClosure:
        """Build the closure of the contract for ``batch``; ``closure.first_loss`` holds the pass-1 mean loss."""

        def run(closure: StepClosure, call: int) -> torch.Tensor:
            self.closure_call = call
            with self.closure_call_context(optimizer, call):
                losses, logits = self.forward_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss = losses.mean()
                self.manual_backward(loss)
            if call == 0:
                closure.first_loss = loss.detach()
                self.train_metrics.update(logits.detach(), batch["target"])
            return losses.detach()

        return StepClosure(run)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch = as_dict_batch(batch)
        closure = self.step_with_closure(batch)
        self.log_training_step(batch, closure)
        return closure.first_loss

    def step_with_closure(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """One optimizer step on ``batch`` under the closure contract (and a per-step scheduler step); returns the
        evaluated closure (``first_loss`` and whatever :meth:`make_closure` recorded)."""
        opt = self.optimizers()
        closure = self.make_closure(batch, opt)
        opt.step(closure=closure)
        if closure.calls == 0:
            raise RuntimeError(
                f"{type(opt.optimizer).__name__}.step(closure) did not evaluate the closure; optimizers used with "
                f"{type(self).__name__} must call it (see the closure contract in ARCHITECTURE.md)"
            )
        self.closure_call = 0
        if self.scheduler_interval == "step":
            self._step_schedulers()
        return closure

    def log_training_step(self, batch: Mapping[str, torch.Tensor], closure: Any) -> None:
        """Log the pass-1 loss and the training metrics of one step (methods add their own terms)."""
        n = batch["target"].shape[0]
        self.log("train/loss", closure.first_loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=n)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning runs this after every closure call (after GradScaler unscaling), i.e. after each backward.
        if self.grad_clip_norm:
            self.clip_gradients(optimizer, self.grad_clip_norm, gradient_clip_algorithm="norm")

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        opts = self.optimizers()
        return [getattr(o, "optimizer", o) for o in (opts if isinstance(opts, list) else [opts])]

    def on_train_epoch_end(self) -> None:
        self.log("train/lr", float(self._optimizers()[0].param_groups[0]["lr"]), on_epoch=True, batch_size=1)
        if self.scheduler_interval == "epoch":
            self._step_schedulers()

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for sch in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = self.trainer.callback_metrics.get(self.scheduler_monitor)
                if metric is None:
                    raise KeyError(
                        f"ReduceLROnPlateau needs the metric {self.scheduler_monitor!r}, which was not logged; "
                        f"logged metrics: {sorted(self.trainer.callback_metrics)}. Set model.scheduler_monitor."
                    )
                sch.step(metric)
            else:
                sch.step()

    # ----------------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Any, metrics: MetricCollection, stage: str) -> None:
        batch = as_dict_batch(batch)
        logits = self(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["target"])
        metrics.update(logits, batch["target"])
        n = batch["target"].shape[0]
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=n, sync_dist=True)
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=n)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        batch = as_dict_batch(batch)
        probs = torch.softmax(self(batch["image"]).float(), dim=-1)
        conf, pred = probs.max(dim=-1)
        out = {"pred": pred, "confidence": conf, "probs": probs}
        for key in ("index", "target"):
            if key in batch:
                out[key] = batch[key]
        return out

    # ----------------------------------------------------------------------------------------------- optimizers
    def parameter_groups(self) -> list[dict]:
        """Role-tagged parameter groups of the trainable parameters (see ``lightning_methods.parameters``)."""
        return param_groups_by_role(self, no_weight_decay_roles=self.no_weight_decay_roles)

    def default_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The optimizer of ``optimizer=None``: SGD(0.1, momentum 0.9, wd 5e-4). The one hook a method overrides to
        give its paper's default (DeepKD's three-momentum SGD, HPN's official SGD)."""
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The configured optimizer (``optimizer`` argument) over ``groups``, else :meth:`default_optimizer`."""
        return self.default_optimizer(groups) if self.optimizer_factory is None else self.optimizer_factory(groups)

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer(self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": self.scheduler_interval}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # torch >= 2.6 loads checkpoints with weights_only=True: store callables (partial optimizer factories from
        # Python) as {"class_path", "init_args"} dicts, the form LightningCLI uses
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = checkpoint_safe(checkpoint["hyper_parameters"], type(self))

    def on_fit_start(self) -> None:
        for opt in self._optimizers():
            self._check_precision(opt)

    def _check_precision(self, opt: torch.optim.Optimizer) -> None:
        if self.trainer.precision in SCALER_PRECISIONS and not getattr(opt, "supports_grad_scaler", True):
            raise ValueError(
                f"{type(opt).__name__} cannot run under precision={self.trainer.precision!r}: a GradScaler cannot "
                "serve its step (it evaluates the closure more than once or reads the loss value). Use "
                "--trainer.precision bf16-mixed on GPUs with bf16 (Ampere or newer), or 32-true."
            )
