"""Logit distillation from a frozen teacher: KD, DKD, and the DeepKD trainer on top of either.

- Hinton, Vinyals, Dean. *Distilling the Knowledge in a Neural Network*. arXiv 1503.02531 (``method="kd"``:
  ``ce_weight * CE + kd_weight * KD``, mdistiller's 0.1 / 0.9, T = 4).
- Zhao et al. *Decoupled Knowledge Distillation*. CVPR 2022, arXiv 2203.08679 (``method="dkd"``:
  ``CE + min(epoch / warmup, 1) * (alpha TCKD + beta NCKD)``, epoch 1-indexed).
- Huang et al. *DeepKD: A Deeply Decoupled and Denoised Knowledge Distillation Trainer*. NeurIPS 2025,
  arXiv 2505.15133 (``deepkd=True``): one forward pass, three gradients (task, TCKD, NCKD) taken with
  ``torch.autograd.grad`` and fed to the three-momentum optimizer :class:`lightning_methods.optim.DeepKD`; NCKD can
  be restricted to the teacher's top-k classes (``topk``, scheduled by
  :class:`lightning_methods.callbacks.TopKScheduleCallback`).

The student is ``self.backbone`` (so everything of :class:`ImageClassifier` applies to it); the teacher is loaded
once, frozen, kept in eval mode whatever Lightning does, and left out of saved checkpoints: they record the
teacher's path and SHA-256 instead, which is checked on resume.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_methods.classifier import ImageClassifier, as_dict_batch
from lightning_methods.distillation.streams import batched_stream_gradients, sequential_stream_gradients
from lightning_methods.distillation.teacher import load_teacher, state_hash
from lightning_methods.losses.kd import kd_loss, nckd_loss, standardize_logits, tckd_loss, teacher_target_prob
from lightning_methods.models import create_backbone
from lightning_methods.optim.deepkd import DeepKD
from lightning_methods.utils.distributed import all_reduce_flat, is_distributed

CKPT_KEY = "distillation_teacher"


class DistillationClassifier(ImageClassifier):
    """Student trained from a frozen teacher with KD or DKD, optionally with the DeepKD trainer.

    Args:
        backbone: the student (a ``create_backbone`` name or a module), e.g. ``"resnet8x4"``.
        teacher: the teacher architecture name (e.g. ``"resnet32x4"``) or a ready, trained ``nn.Module``.
        teacher_checkpoint: teacher weights (see ``lightning_methods.distillation.teacher``): a shared CIFAR-100
            teacher file / folder (``cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``) or a lightning-methods
            ``.ckpt``. Required to fit when ``teacher`` is a name; ``None`` builds an untrained teacher, which is
            only useful to evaluate a distilled student (``load_from_checkpoint(ckpt, teacher_checkpoint=None)``).
        method: ``"kd"`` (Hinton) or ``"dkd"`` (decoupled).
        deepkd: train with DeepKD (three gradient streams; needs the ``DeepKD`` optimizer).
        temperature: softmax temperature T of every distillation term.
        ce_weight: weight of the cross-entropy; default 0.1 for KD (mdistiller), 1.0 for DKD.
        kd_weight: weight of the KD term (plain KD only; KD+DeepKD ignores it, as the official code does).
        alpha: TCKD weight (DKD).
        beta: NCKD weight (DKD; per teacher/student pair).
        warmup_epochs: DKD warm-up length: the TCKD/NCKD weight is ``min((current_epoch + 1) / warmup_epochs, 1)``.
        topk: initial DeepKD top-k of the NCKD mask (0 = all classes); a ``TopKScheduleCallback`` updates it.
        logit_standardization: standardize both logits before the distillation terms (``LOGIT_STAND``).
        exact_per_sample_nckd: KD+DeepKD only: use ``mean((1 - p^t_y) NCKD_i)`` for the NCKD stream instead of the
            official ``mean(1 - p^t_y) * mean(NCKD_i)``.
        log_teacher_accuracy: log ``val/teacher_acc`` in the first validation epoch (a check of the teacher file).
        teacher_allow_pickle: explicit opt-in to unpickle arbitrary objects in the teacher file (``weights_only=False``;
            warns). Off by default: teacher files load with ``weights_only=True`` and can never run code.
        deepkd_streams: how DeepKD's three gradients are taken: ``"batched"`` (one backward pass with the three
            logit gradients stacked, ``lightning_methods.distillation.streams``; falls back to sequential, with a
            warning, where an operation has no batched backward, or when a subclass overrides ``loss_terms``),
            ``"sequential"`` (three backward passes, as the official code), or ``"auto"``: batched on CUDA devices,
            sequential on the CPU, where the batched backward measured about 20% slower (resnet8 student, batch 128).
        **kwargs: every argument of :class:`ImageClassifier` (``num_classes``, ``optimizer``, ``lr_scheduler``,
            ``grad_clip_norm``, ...), by keyword. ``optimizer=None`` means SGD lr 0.05, momentum 0.9, wd 5e-4, or
            ``DeepKD`` with its defaults when ``deepkd=True``.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet8x4",
        teacher: str | nn.Module = "resnet32x4",
        teacher_checkpoint: str | None = None,
        method: Literal["kd", "dkd"] = "dkd",
        deepkd: bool = False,
        temperature: float = 4.0,
        ce_weight: float | None = None,
        kd_weight: float = 0.9,
        alpha: float = 1.0,
        beta: float = 8.0,
        warmup_epochs: int = 20,
        topk: int = 0,
        logit_standardization: bool = False,
        exact_per_sample_nckd: bool = False,
        log_teacher_accuracy: bool = True,
        teacher_allow_pickle: bool = False,
        deepkd_streams: Literal["auto", "batched", "sequential"] = "auto",
        **kwargs: Any,
    ) -> None:
        if method not in ("kd", "dkd"):
            raise ValueError(f"method must be 'kd' or 'dkd', got {method!r}")
        if deepkd_streams not in ("auto", "batched", "sequential"):
            raise ValueError(f"deepkd_streams must be 'auto', 'batched' or 'sequential', got {deepkd_streams!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if deepkd and kwargs.get("grad_clip_norm"):
            raise ValueError("grad_clip_norm is not supported with deepkd=True (the three gradient streams never reach "
                             "p.grad); set model.grad_clip_norm null")
        super().__init__(backbone=backbone, **kwargs)
        num_classes, channels_last = self.num_classes, self.channels_last
        ignore = [n for n, v in (("backbone", backbone), ("teacher", teacher)) if isinstance(v, nn.Module)]
        self.save_hyperparameters(ignore=ignore or None)
        self.ce_weight = ce_weight if ce_weight is not None else (0.1 if method == "kd" else 1.0)
        self.topk = int(topk)
        self.teacher_path: str | None = None
        if isinstance(teacher, nn.Module):
            self.teacher, self.teacher_ready = teacher, True
        elif teacher_checkpoint is not None:
            self.teacher, file = load_teacher(teacher, teacher_checkpoint, num_classes,
                                              allow_pickle=teacher_allow_pickle)
            self.teacher_path, self.teacher_ready = str(file), True
        else:
            self.teacher, self.teacher_ready = create_backbone(teacher, num_classes), False
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self.teacher_sha256 = state_hash(self.teacher) if self.teacher_ready else None
        self.teacher_architecture = teacher if isinstance(teacher, str) else type(teacher).__name__
        self.teacher_metric = (MulticlassAccuracy(num_classes, average="micro", validate_args=False)
                               if log_teacher_accuracy else None)
        self._teacher_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # the batched path needs every loss term to depend on the student only through its logits
        own_terms = type(self).loss_terms is DistillationClassifier.loss_terms
        self._batched_streams = own_terms and (None if deepkd_streams == "auto" else deepkd_streams == "batched")
        self._batched_ok = False

    @property
    def student(self) -> nn.Module:
        return self.backbone

    # ---------------------------------------------------------------------------------------------- teacher
    def train(self, mode: bool = True) -> DistillationClassifier:
        super().train(mode)
        self.teacher.eval()  # Lightning calls .train() on the whole module every epoch
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits in eval mode without autograd (cached across the closure calls of one step)."""
        cache = self._teacher_cache
        if cache is not None and cache[0] is images:
            return cache[1]
        if self.teacher.training:
            self.teacher.eval()
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        logits = self.teacher(x)
        self._teacher_cache = (images, logits)
        return logits

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.teacher_ready:
            name = self.teacher_architecture
            raise ValueError(
                f"no teacher weights: set model.teacher_checkpoint (e.g. --model.teacher_checkpoint "
                f"cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth, or the last.ckpt of "
                f"`lightning-methods fit --config configs/distillation/teachers/{name.lower()}.yaml`)"
            )

    # ---------------------------------------------------------------------------------------------- losses
    def kd_warmup(self) -> float:
        """DKD warm-up weight ``min(epoch / warmup, 1)`` with the 1-indexed epoch."""
        w = self.hparams.warmup_epochs
        return 1.0 if w <= 0 else min((self.current_epoch + 1) / w, 1.0)

    def distillation_terms(self, logits: torch.Tensor, teacher_logits: torch.Tensor,
                           target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample, weighted terms: ``{"tckd", "nckd"}`` (DKD, or KD decomposed) or ``{"kd"}`` (plain KD)."""
        hp = self.hparams
        s, t = logits.float(), teacher_logits.float()
        if hp.logit_standardization:
            s, t = standardize_logits(s), standardize_logits(t)
        k = self.topk if 0 < self.topk < s.shape[1] else None
        if hp.method == "kd" and not hp.deepkd and k is None:
            return {"kd": hp.kd_weight * kd_loss(s, t, hp.temperature, "none")}
        tc = tckd_loss(s, t, target, hp.temperature, "none")
        nc = nckd_loss(s, t, target, hp.temperature, k, "none")
        if hp.method == "dkd":
            w = self.kd_warmup()
            return {"tckd": hp.alpha * w * tc, "nckd": hp.beta * w * nc}
        one_minus_p = 1.0 - teacher_target_prob(t, target, hp.temperature)
        if hp.deepkd and not hp.exact_per_sample_nckd:
            # official KD+DeepKD: the batch-mean NCKD times the batch-mean factor (mean of this vector)
            nc = one_minus_p.mean() * nc.mean().expand_as(nc)
        else:
            nc = one_minus_p * nc
        scale = 1.0 if hp.deepkd else hp.kd_weight  # KD = TCKD + (1 - p_y) NCKD
        return {"tckd": scale * tc, "nckd": scale * nc}

    def loss_terms(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Student forward + teacher forward -> (per-sample terms ``{"ce", ...}``, student logits)."""
        logits = self(batch["image"])
        teacher_logits = self.teacher_logits(batch["image"])
        terms = {"ce": self.ce_weight * self.per_sample_loss(logits, batch)}
        terms.update(self.distillation_terms(logits, teacher_logits, batch["target"]))
        return terms, logits

    def _log_terms(self, terms: Mapping[str, torch.Tensor], n: int) -> None:
        if self._trainer is None:  # called outside a Trainer (e.g. from a notebook or a test)
            return
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach().mean(), on_step=False, on_epoch=True, batch_size=n)
        self.log("train/topk", float(self.topk or self.num_classes), on_step=False, on_epoch=True, batch_size=n)

    def forward_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        terms, logits = self.loss_terms(batch)
        if self.closure_call == 0:
            self._log_terms(terms, batch["target"].shape[0])
        return sum(terms.values()), logits

    # ---------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        try:
            if not self.hparams.deepkd:
                return super().training_step(batch, batch_idx)
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

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            groups = self.parameter_groups()
            optimizer = DeepKD(groups) if self.hparams.deepkd else torch.optim.SGD(groups, lr=0.05, momentum=0.9,
                                                                                   weight_decay=5e-4)
            if self.scheduler_factory is None:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                             "interval": self.scheduler_interval}}
        out = super().configure_optimizers()
        optimizer = out["optimizer"] if isinstance(out, dict) else out
        if self.hparams.deepkd != isinstance(optimizer, DeepKD):
            need = "lightning_methods.optim.DeepKD" if self.hparams.deepkd else "an optimizer other than DeepKD"
            raise TypeError(f"deepkd={self.hparams.deepkd} needs {need} as model.optimizer, got "
                            f"{type(optimizer).__name__}")
        return out

    # ---------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.teacher_metric is not None and self.current_epoch == 0 and not self.trainer.sanity_checking:
            batch = as_dict_batch(batch)
            self.teacher_metric.update(self.teacher_logits(batch["image"]), batch["target"])
            self._teacher_cache = None
            self.log("val/teacher_acc", self.teacher_metric, on_epoch=True, batch_size=batch["target"].shape[0])

    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint.get("state_dict", {})
        for key in [k for k in sd if k.startswith("teacher.")]:
            del sd[key]  # the teacher is recorded by path and hash, not duplicated into every student checkpoint
        checkpoint[CKPT_KEY] = {"architecture": self.teacher_architecture, "path": self.teacher_path,
                                "sha256": self.teacher_sha256, "topk": self.topk}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get(CKPT_KEY) or {}
        saved = info.get("sha256")
        if saved is not None and self.teacher_sha256 is not None and saved != self.teacher_sha256:
            raise ValueError(
                f"the teacher differs from the one this checkpoint was trained with: the checkpoint recorded "
                f"{info.get('path')} (sha256 {saved[:12]}...), the module loaded {self.teacher_path} (sha256 "
                f"{self.teacher_sha256[:12]}...). Set model.teacher_checkpoint to the original teacher file."
            )
        if saved is not None and self.teacher_sha256 is None:
            warnings.warn("loading a distilled checkpoint without its teacher (teacher_checkpoint=None): the teacher "
                          "is untrained; evaluation of the student is fine, fitting is refused", stacklevel=2)
        self.topk = int(info.get("topk", self.topk))
        sd = checkpoint.setdefault("state_dict", {})
        for key, value in self.teacher.state_dict().items():
            sd.setdefault(f"teacher.{key}", value)


def all_reduce_streams(streams: tuple[tuple[torch.Tensor | None, ...], ...]) -> tuple[list[torch.Tensor | None], ...]:
    """Average gradient streams over all ranks in one flat all-reduce (a no-op without an initialized process group
    of more than one rank). ``autograd.grad`` bypasses DDP's gradient hooks, so this replaces DDP's own all-reduce."""
    out = tuple(list(s) for s in streams)
    if not is_distributed():
        return out
    reduced = iter(all_reduce_flat([g for s in out for g in s if g is not None], op="mean"))
    return tuple([None if g is None else next(reduced) for g in s] for s in out)
