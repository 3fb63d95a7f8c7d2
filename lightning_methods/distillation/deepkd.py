"""DeepKD: Huang et al., *DeepKD: A Deeply Decoupled and Denoised Knowledge Distillation Trainer*, NeurIPS 2025,
arXiv 2505.15133.

One forward pass, three gradients (task, TCKD, NCKD) taken with ``torch.autograd.grad`` and fed to the
three-momentum optimizer :class:`lightning_methods.optim.DeepKD`; NCKD can be restricted to the teacher's top-k
classes (``topk``, scheduled by :class:`lightning_methods.callbacks.TopKScheduleCallback`). The trainer runs on DKD's
terms (:class:`DeepKDClassifier`, the paper's main setting) or on KD split as ``TCKD + (1 - p^t_y) NCKD``
(:class:`KDDeepKDClassifier`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch

from lightning_methods.classifier import as_dict_batch
from lightning_methods.distillation.base import DistillationClassifier
from lightning_methods.distillation.dkd import DKDClassifier
from lightning_methods.distillation.kd import KDClassifier
from lightning_methods.distillation.streams import batched_stream_gradients, sequential_stream_gradients
from lightning_methods.optim.deepkd import DeepKD
from lightning_methods.utils.distributed import all_reduce_flat, is_distributed

Streams = Literal["auto", "batched", "sequential"]


class DeepKDMixin:
    """The DeepKD trainer over a distillation method's ``loss_terms`` (which must give ``ce``, ``tckd``, ``nckd``).

    Args (of the classes that use it):
        topk: initial top-k of the NCKD mask (0 = all classes); a ``TopKScheduleCallback`` updates it.
        deepkd_streams: how the three gradients are taken: ``"batched"`` (one backward pass with the three logit
            gradients stacked, ``lightning_methods.distillation.streams``; falls back to sequential, with a warning,
            where an operation has no batched backward, or when a subclass overrides ``loss_terms``),
            ``"sequential"`` (three backward passes, as the official code), or ``"auto"``: batched on CUDA devices,
            sequential on the CPU, where the batched backward measured about 20% slower (resnet8 student, batch 128).
    """

    uses_deepkd_optimizer = True

    def _init_deepkd(self, topk: int, deepkd_streams: Streams) -> None:
        if deepkd_streams not in ("auto", "batched", "sequential"):
            raise ValueError(f"deepkd_streams must be 'auto', 'batched' or 'sequential', got {deepkd_streams!r}")
        self.topk = int(topk)
        # the batched path needs every loss term to depend on the student only through its logits
        own_terms = type(self).loss_terms is DistillationClassifier.loss_terms
        self._batched_streams = own_terms and (None if deepkd_streams == "auto" else deepkd_streams == "batched")
        self._batched_ok = False

    @staticmethod
    def _refuse_grad_clip(kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("grad_clip_norm"):
            raise ValueError("grad_clip_norm is not supported with DeepKD (the three gradient streams never reach "
                             "p.grad); set model.grad_clip_norm null")

    def default_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        return DeepKD(groups)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        try:
            return self._deepkd_step(as_dict_batch(batch))
        finally:
            self._teacher_cache = None

    def _deepkd_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        opt = self.optimizers()
        inner = opt.optimizer
        terms, logits = self.loss_terms(batch)
        task = terms["ce"].mean()
        tc, nc = terms["tckd"].mean(), terms["nckd"].mean()
        g_tog, g_tcg, g_ncg = self.stream_gradients((task, tc, nc), logits, inner.ordered_params())
        opt.step(grads=all_reduce_streams((g_tog, g_tcg, g_ncg)))
        if self.scheduler_interval == "step":
            self._step_schedulers()
        n = batch["target"].shape[0]
        loss = (task + tc + nc).detach()
        self._log_terms(terms, n)
        self.train_metrics.update(logits.detach(), batch["target"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def stream_gradients(self, losses: tuple[torch.Tensor, ...], logits: torch.Tensor,
                         params: list[torch.Tensor]) -> tuple[list[torch.Tensor | None], ...]:
        """The parameter gradients of ``losses`` (task, TCKD, NCKD): one batched backward pass, or three."""
        if self._batched_streams is None:  # "auto"
            self._batched_streams = logits.is_cuda
        if self._batched_streams:
            try:
                # the first step keeps the graph, so that the sequential fallback can still run if vmap fails
                out = batched_stream_gradients(losses, logits, params, retain_graph=not self._batched_ok)
                self._batched_ok = True
                return out
            except RuntimeError as err:
                if self._batched_ok:
                    raise
                warnings.warn(f"DeepKD: the batched backward pass failed ({str(err).splitlines()[0]}); taking the "
                              "three gradient streams with three backward passes instead", stacklevel=2)
                self._batched_streams = False
        return sequential_stream_gradients(losses, params)


class DeepKDClassifier(DeepKDMixin, DKDClassifier):
    """DKD + DeepKD (the paper's main setting): DKD's terms, three gradient streams, the DeepKD optimizer.

    Args:
        topk, deepkd_streams: see :class:`DeepKDMixin`.
        **kwargs: the arguments of :class:`DKDClassifier` (``alpha``, ``beta``, ``warmup_epochs``, ...).
    """

    def __init__(self, topk: int = 0, deepkd_streams: Streams = "auto", **kwargs: Any) -> None:
        self._refuse_grad_clip(kwargs)
        super().__init__(**kwargs)
        self._init_deepkd(topk, deepkd_streams)


class KDDeepKDClassifier(DeepKDMixin, KDClassifier):
    """KD + DeepKD: KD split exactly as ``TCKD + (1 - p^t_y) NCKD``, three gradient streams, the DeepKD optimizer.

    The KD weight is unused (as in the official code); the NCKD stream is the official batch-mean product
    ``mean(1 - p^t_y) * mean(NCKD_i)`` unless ``exact_per_sample_nckd``.

    Args:
        topk, deepkd_streams: see :class:`DeepKDMixin`.
        exact_per_sample_nckd: use ``mean((1 - p^t_y) NCKD_i)`` for the NCKD stream instead of the official form.
        **kwargs: the arguments of :class:`KDClassifier` (``ce_weight``, ``temperature``, ...).
    """

    def __init__(self, topk: int = 0, deepkd_streams: Streams = "auto", exact_per_sample_nckd: bool = False,
                 **kwargs: Any) -> None:
        self._refuse_grad_clip(kwargs)
        super().__init__(**kwargs)
        self._init_deepkd(topk, deepkd_streams)
        self.exact_per_sample_nckd = exact_per_sample_nckd

    def distillation_terms(self, logits: torch.Tensor, teacher_logits: torch.Tensor,
                           target: torch.Tensor) -> dict[str, torch.Tensor]:
        s, t = self.prepared_logits(logits, teacher_logits)
        tc, nc = self.decomposed_kd(s, t, target, batch_mean_nckd=not self.exact_per_sample_nckd)
        return {"tckd": tc, "nckd": nc}


def distiller_class(method: Literal["kd", "dkd"], deepkd: bool = False) -> type[DistillationClassifier]:
    """The class of a method named the way papers' tables do: ``("dkd", True)`` -> :class:`DeepKDClassifier`."""
    table = {("kd", False): KDClassifier, ("dkd", False): DKDClassifier, ("kd", True): KDDeepKDClassifier,
             ("dkd", True): DeepKDClassifier}
    if (method, bool(deepkd)) not in table:
        raise ValueError(f"method must be 'kd' or 'dkd', got {method!r}")
    return table[(method, bool(deepkd))]


def all_reduce_streams(streams: tuple[tuple[torch.Tensor | None, ...], ...]) -> tuple[list[torch.Tensor | None], ...]:
    """Average gradient streams over all ranks in one flat all-reduce (a no-op without an initialized process group
    of more than one rank). ``autograd.grad`` bypasses DDP's gradient hooks, so this replaces DDP's own all-reduce."""
    out = tuple(list(s) for s in streams)
    if not is_distributed():
        return out
    reduced = iter(all_reduce_flat([g for s in out for g in s if g is not None], op="mean"))
    return tuple([None if g is None else next(reduced) for g in s] for s in out)
