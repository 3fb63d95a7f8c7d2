"""Shared pieces of the HPN LightningModules: the output backbone, the loss reduction (sum / mean, per device or
global under DDP), the official default optimizer, and regression bounds / targets / metrics.

Mettes, van der Pol, Snoek. *Hyperspherical Prototype Networks*. NeurIPS 2019, arXiv 1901.10514.

**Loss reduction under the closure contract.** ``ImageClassifier``'s closure back-propagates the *mean* of the
per-sample vector that ``forward_loss`` returns. With ``reduction="sum"`` (official) every per-sample value is
multiplied by the local batch size ``n`` (and by the world size ``W`` with ``sum_scope="global"``), so that mean is
the sum-reduced loss; the returned vector (read by loss-adaptive optimizers and logged as ``train/loss``) carries
the same scale. DDP averages gradients over ranks, hence the effective gradient per step:

- ``sum``, ``sum_scope="device"`` (default): ``(1/W) sum over the global batch``, i.e. the gradient of a sum over
  the *per-device* batch. With the per-device batch at the paper's 128 each rank takes the official step size;
- ``sum``, ``sum_scope="global"``: ``sum over the global batch``: W processes with ``B/W`` samples each take exactly
  the step of one process with ``B`` samples (tested);
- ``mean``: ``(1/B) sum over the global batch`` (equal per-rank batches): lr must grow by the batch size to match
  the official step (a warning says so).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from lightning_methods.losses.hpn import check_bounds, regression_cosine_target, regression_prediction
from lightning_methods.models import create_backbone

Reduction = Literal["sum", "mean"]
SumScope = Literal["device", "global"]

#: The official CIFAR-100 optimizer (hpn_cifar.py): SGD lr 0.01, momentum 0.9, weight decay 1e-4.
official_sgd = partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4)


def output_backbone(backbone: str | nn.Module, out_dims: int, backbone_kwargs: dict[str, Any] | None) -> nn.Module:
    """A backbone whose last layer outputs ``out_dims`` values (a ready module is returned unchanged)."""
    if isinstance(backbone, nn.Module):
        return backbone
    return create_backbone(backbone, out_dims, **(backbone_kwargs or {}))


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is a 16-bit float (mixed precision), else unchanged: a float64 model's predictions stay
    float64 (``.float()`` would round them)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class LossScaleMixin:
    """``reduction`` / ``sum_scope`` handling (see the module docstring); call :meth:`_init_loss_scale`."""

    _trainer: Any

    def _init_loss_scale(self, reduction: Reduction, sum_scope: SumScope, cosine_eps: float) -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' (official) or 'mean', got {reduction!r}")
        if sum_scope not in ("device", "global"):
            raise ValueError(f"sum_scope must be 'device' or 'global', got {sum_scope!r}")
        if not cosine_eps > 0:
            raise ValueError(f"cosine_eps must be > 0, got {cosine_eps}")
        if reduction == "mean":
            warnings.warn("HPN with reduction='mean': the official lr 0.01 is tuned for a sum over the batch; "
                          "multiply the lr by the batch size or expect under-training", stacklevel=3)
        self.reduction, self.sum_scope, self.cosine_eps = reduction, sum_scope, cosine_eps

    def default_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The official HPN optimizer (``optimizer=None``): SGD lr 0.01, momentum 0.9, wd 1e-4."""
        return official_sgd(groups)

    def loss_scale(self, n: int) -> float:
        """Factor applied to per-sample losses so that their mean is the configured reduction."""
        if self.reduction == "mean":
            return 1.0
        world = self._trainer.world_size if getattr(self, "_trainer", None) is not None else 1
        return float(n * (world if self.sum_scope == "global" else 1))


def regression_metrics() -> MetricCollection:
    """MAE and RMSE in the target's own units."""
    return MetricCollection({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False)})


class RegressionMixin:
    """Regression targets with antipodal poles: bounds, target mapping, predictions (call :meth:`_init_regression`).

    Bounds ``(v_l, v_u)``: given, or read at ``setup`` from ``trainer.datamodule.regression_bounds()`` (the training
    split's min / max). They are written into ``hparams`` (so checkpoints and ``load_from_checkpoint`` keep them).
    Training targets outside given bounds are an error at ``setup`` when the DataModule can tell, unless
    ``clip_targets`` maps them to the nearest pole. Predictions always lie inside ``[v_l, v_u]``; evaluation targets
    outside the bounds are compared as they are (their error includes the distance to the bound).
    """

    hparams: Any
    _trainer: Any

    def _init_regression(self, bounds: tuple[float, float] | list[float] | None, clip_targets: bool,
                         regression_key: str) -> None:
        if bounds is not None:
            if len(bounds) != 2:
                raise ValueError(f"bounds must be (lower, upper), got {bounds}")
            check_bounds(float(bounds[0]), float(bounds[1]))
            bounds = (float(bounds[0]), float(bounds[1]))
        self.bounds, self.clip_targets, self.regression_key = bounds, clip_targets, regression_key

    def _resolve_bounds(self) -> None:
        """Take / check the bounds against the training DataModule (runs in ``setup``, identically on every rank)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_bounds = dm.regression_bounds() if dm is not None and hasattr(dm, "regression_bounds") else None
        if self.bounds is None:
            if data_bounds is None:
                raise ValueError(f"{type(self).__name__} needs regression bounds: pass bounds=(lower, upper) (e.g. "
                                 "--model.init_args.bounds='[1000, 1932]') or use a DataModule with "
                                 "regression_bounds()")
            self.bounds = (float(data_bounds[0]), float(data_bounds[1]))
            check_bounds(*self.bounds)
        elif data_bounds is not None and not self.clip_targets:
            lo, hi = data_bounds
            if lo < self.bounds[0] or hi > self.bounds[1]:
                raise ValueError(f"training regression targets span [{lo}, {hi}], outside bounds {self.bounds}: "
                                 "their cosine targets would leave [-1, 1] and be unreachable. Widen bounds, leave "
                                 "them empty to use the data's range, or set clip_targets=true")
        self.hparams["bounds"] = list(self.bounds)

    def _require_bounds(self) -> tuple[float, float]:
        if self.bounds is None:
            raise RuntimeError(f"{type(self).__name__} has no regression bounds yet: pass bounds=(lower, upper), "
                               "fit it, or load a checkpoint of a fitted model")
        return self.bounds

    def regression_values(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The real-valued target of a batch: ``batch[regression_key]``, else a floating ``batch["target"]``."""
        if self.regression_key in batch:
            return batch[self.regression_key]
        if "target" in batch and batch["target"].is_floating_point():
            return batch["target"]
        raise KeyError(f"{type(self).__name__} needs the real-valued target under {self.regression_key!r} (or a "
                       f"floating 'target'); the batch has {sorted(batch)}. Set regression_key.")

    def cosine_targets(self, values: torch.Tensor) -> torch.Tensor:
        lo, hi = self._require_bounds()
        r = regression_cosine_target(values, lo, hi)
        return r.clamp(-1.0, 1.0) if self.clip_targets else r

    def predict_values(self, cos_upper: torch.Tensor) -> torch.Tensor:
        lo, hi = self._require_bounds()
        return regression_prediction(cos_upper, lo, hi)

    def _load_bounds(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("hyper_parameters") or {}).get("bounds")
        if saved is None:
            return
        saved = (float(saved[0]), float(saved[1]))
        if self.bounds is not None and tuple(self.bounds) != saved:
            warnings.warn(f"checkpoint regression bounds {saved} replace {self.bounds}: the model was trained with "
                          "them", stacklevel=2)
        self.bounds = saved
        self.hparams["bounds"] = list(saved)
