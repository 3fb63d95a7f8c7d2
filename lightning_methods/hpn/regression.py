"""HPN regression (antipodal prototypes) and the t-weighted multi-task model (classification + regression).

Mettes, van der Pol, Snoek. *Hyperspherical Prototype Networks*. NeurIPS 2019, arXiv 1901.10514 (section 3; the task
weight t of ``L_m = t L_c + (1 - t) L_r`` from the authors' response: robust to t, best at t = 0.25 on OmniArt).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from lightning_methods.classifier import ImageClassifier, as_dict_batch
from lightning_methods.hpn.base import (
    LossScaleMixin,
    Reduction,
    RegressionMixin,
    SumScope,
    at_least_float32,
    output_backbone,
    regression_metrics,
)
from lightning_methods.hpn.classifier import HPNClassifier
from lightning_methods.losses.hpn import (
    check_task_weight,
    cosine_regression_loss,
    hpn_classification_loss,
    upper_pole_cosine,
)


class HPNRegressor(LossScaleMixin, RegressionMixin, ImageClassifier):
    """Regression on the hypersphere: the cosine of the output to the upper prototype ``e_1`` (the lower one is
    ``-e_1``) is trained towards the target mapped into [-1, 1] by the training bounds, with
    ``L_r = sum (r - cos(o, e_1))^2``; the prediction maps the cosine back. Logs MAE and RMSE in target units.

    Works on any DataModule whose batches carry a real-valued target (``batch[regression_key]``, or a floating
    ``batch["target"]``); a class label in ``"target"`` is ignored.

    Args:
        output_dims: output dimension D >= 2 (our default 2; the official OmniArt script uses 47).
        bounds: ``(v_l, v_u)``; ``None`` takes the training split's range from the DataModule's
            ``regression_bounds()`` at setup. Saved in ``hparams``.
        clip_targets: map training targets outside the bounds to the nearest pole instead of failing at setup.
        regression_key: batch key of the real-valued target.
        reduction, sum_scope, cosine_eps: as for :class:`HPNClassifier` (sum over the batch by default).
        backbone: backbone name (its output size is set to ``output_dims``) or a module that outputs that many.
        **kwargs: the ``ImageClassifier`` arguments; ``optimizer=None`` means the official SGD(0.01, 0.9, 1e-4).

    Raises:
        ValueError: ``output_dims < 2``, bounds with ``lower >= upper``, training targets outside given bounds.
    """

    def __init__(
        self,
        output_dims: int = 2,
        bounds: tuple[float, float] | None = None,
        clip_targets: bool = False,
        regression_key: str = "regression_target",
        reduction: Reduction = "sum",
        sum_scope: SumScope = "device",
        cosine_eps: float = 1e-9,
        backbone: str | nn.Module = "hpn_resnet32",
        **kwargs: Any,
    ) -> None:
        if output_dims < 2:
            raise ValueError(f"output_dims must be >= 2 (a cosine in 1 dimension is only +-1), got {output_dims}")
        net = output_backbone(backbone, output_dims, kwargs.get("backbone_kwargs"))
        super().__init__(backbone=net, **kwargs)
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if self.label_smoothing:
            raise ValueError("HPNRegressor has no label smoothing; set it to 0")
        self._init_loss_scale(reduction, sum_scope, cosine_eps)
        self._init_regression(bounds, clip_targets, regression_key)
        self.output_dims = output_dims

    def make_metrics(self) -> MetricCollection:
        """Regression metrics (the base's accuracy metrics do not apply to a value)."""
        return regression_metrics()

    def setup(self, stage: str) -> None:
        if stage == "fit" or self.bounds is None:
            self._resolve_bounds()

    def _with_value_target(self, batch: Any) -> dict[str, torch.Tensor]:
        batch = dict(as_dict_batch(batch))
        batch["target"] = self.regression_values(batch)
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # the base closure updates the training metrics with (logits, batch["target"]): here (prediction, value)
        return super().training_step(self._with_value_target(batch), batch_idx)

    def forward_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        output = self(batch["image"])
        loss = cosine_regression_loss(output, self.cosine_targets(batch["target"]), "none", self.cosine_eps)
        return loss * self.loss_scale(output.shape[0]), self.predict_values(upper_pole_cosine(output, self.cosine_eps))

    def _eval(self, batch: Any, stage: str) -> None:
        batch = self._with_value_target(batch)
        output = self(batch["image"])
        loss = cosine_regression_loss(output, self.cosine_targets(batch["target"]), "mean", self.cosine_eps)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(self.predict_values(upper_pole_cosine(output, self.cosine_eps)), batch["target"].float())
        n = output.shape[0]
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=n, sync_dist=True)
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=n)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        batch = as_dict_batch(batch)
        output = self(batch["image"])
        cos = upper_pole_cosine(output, self.cosine_eps)
        out = {"pred": self.predict_values(cos), "cosine": cos, "output": at_least_float32(output)}
        for key in ("index", "target", self.regression_key):
            if key in batch:
                out[key] = batch[key]
        return out

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._load_bounds(checkpoint)


class HPNMultiTask(RegressionMixin, HPNClassifier):
    """Joint classification and regression in one output (official OmniArt split): ``o`` has ``reg_dim + D``
    values; the regression cosine is ``cos(o, e_1)`` on the whole ``o``, the class cosines use ``o[reg_dim:]``
    against K prototypes in D dimensions; ``L_m = t L_c + (1 - t) L_r``.

    Logs accuracy / top-5 (``acc``), ``mae`` / ``rmse`` (target units) and the two loss terms ``loss_c`` / ``loss_r``
    (per-sample means) for train, val and test. Batches carry the class in ``"target"`` and the real value in
    ``batch[regression_key]``.

    Args:
        task_weight: t in [0, 1]: 1 = classification only, 0 = regression only (official default 0.5; the authors
            report t = 0.25 slightly best).
        reg_dim: leading output values left out of the classification cosine (official 1).
        bounds, clip_targets, regression_key: as for :class:`HPNRegressor`.
        **kwargs: the :class:`HPNClassifier` arguments (``prototype_dims`` = D, ``prototype_file``, ``backbone``, ...).

    Raises:
        ValueError: ``task_weight`` outside [0, 1], ``reg_dim < 1``, and the errors of the parent classes.
    """

    def __init__(
        self,
        task_weight: float = 0.5,
        reg_dim: int = 1,
        bounds: tuple[float, float] | None = None,
        clip_targets: bool = False,
        regression_key: str = "regression_target",
        **kwargs: Any,
    ) -> None:
        check_task_weight(task_weight)
        if reg_dim < 1:
            raise ValueError(f"reg_dim must be >= 1 (the regression pole e_1 is output value 0), got {reg_dim}")
        self.reg_dim = reg_dim  # read by output_dims() inside HPNClassifier.__init__
        super().__init__(**kwargs)
        self._init_regression(bounds, clip_targets, regression_key)
        self.task_weight = float(task_weight)
        self.train_reg_metrics = regression_metrics().clone(prefix="train/")
        self.val_reg_metrics = regression_metrics().clone(prefix="val/")
        self.test_reg_metrics = regression_metrics().clone(prefix="test/")

    def output_dims(self, prototype_dims: int) -> int:
        return self.reg_dim + prototype_dims

    def setup(self, stage: str) -> None:
        if stage == "fit" or self.bounds is None:
            self._resolve_bounds()

    def class_output(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, self.reg_dim:]

    def hpn_losses(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "soft_target" in batch:
            raise ValueError("HPN cannot train on soft targets (CutMix / MixUp): set cutmix_alpha and mixup_alpha to 0")
        self._check_ready()
        loss_c = hpn_classification_loss(self.class_output(output), self.prototypes, batch["target"], "none",
                                         self.cosine_eps)
        r = self.cosine_targets(self.regression_values(batch))
        loss_r = cosine_regression_loss(output, r, "none", self.cosine_eps)
        t = self.task_weight
        return {"loss": t * loss_c + (1 - t) * loss_r, "loss_c": loss_c, "loss_r": loss_r}

    def _predict(self, output: torch.Tensor) -> torch.Tensor:
        return self.predict_values(upper_pole_cosine(output, self.cosine_eps))

    def after_train_forward(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor],
                            losses: dict[str, torch.Tensor]) -> None:
        if self.closure_call != 0 or not self.training:
            return
        n = output.shape[0]
        self.train_reg_metrics.update(self._predict(output.detach()), self.regression_values(batch).float())
        for key in ("loss_c", "loss_r"):
            self.log(f"train/{key}", losses[key].detach().mean(), on_step=False, on_epoch=True, batch_size=n)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch = as_dict_batch(batch)
        loss = super().training_step(batch, batch_idx)
        self.log_dict(self.train_reg_metrics, on_step=False, on_epoch=True, batch_size=batch["target"].shape[0])
        return loss

    def after_eval_forward(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor], stage: str) -> None:
        metrics = self.val_reg_metrics if stage == "val" else self.test_reg_metrics
        metrics.update(self._predict(output), self.regression_values(batch).float())
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=output.shape[0])

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        out = super().predict_step(batch, batch_idx, dataloader_idx)
        cos = upper_pole_cosine(out["output"], self.cosine_eps)
        out.update({"value": self.predict_values(cos), "value_cosine": cos})
        batch = as_dict_batch(batch)
        if self.regression_key in batch:
            out[self.regression_key] = batch[self.regression_key]
        return out

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._load_bounds(checkpoint)
