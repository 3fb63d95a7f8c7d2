"""The distillation base: a student :class:`~lightning_methods.ImageClassifier` trained from a frozen teacher.

Each method is a small subclass that says which distillation terms it adds to the cross-entropy
(:meth:`DistillationClassifier.distillation_terms`), in the shape of mdistiller's distillers:

- :class:`~lightning_methods.distillation.KDClassifier` (``kd.py``): Hinton et al., *Distilling the Knowledge in a
  Neural Network*, arXiv 1503.02531.
- :class:`~lightning_methods.distillation.DKDClassifier` (``dkd.py``): Zhao et al., *Decoupled Knowledge
  Distillation*, CVPR 2022, arXiv 2203.08679.
- :class:`~lightning_methods.distillation.DeepKDClassifier` and
  :class:`~lightning_methods.distillation.KDDeepKDClassifier` (``deepkd.py``): Huang et al., *DeepKD: A Deeply
  Decoupled and Denoised Knowledge Distillation Trainer*, NeurIPS 2025, arXiv 2505.15133, on DKD or KD.

The student is ``self.backbone`` (so everything of :class:`ImageClassifier` applies to it); the teacher is loaded
once, frozen, kept in eval mode whatever Lightning does, and left out of saved checkpoints: they record the
teacher's path and SHA-256 instead, which is checked on resume.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_methods.classifier import ImageClassifier, as_dict_batch
from lightning_methods.distillation.teacher import load_teacher, state_hash
from lightning_methods.losses.kd import standardize_logits
from lightning_methods.models import create_backbone
from lightning_methods.optim.deepkd import DeepKD

CKPT_KEY = "distillation_teacher"


class DistillationClassifier(ImageClassifier):
    """Base of the distillation methods: teacher loading, the teacher forward, logging, checkpoints.

    Subclasses implement :meth:`distillation_terms`. This base is not a method by itself.

    Args:
        backbone: the student (a ``create_backbone`` name or a module), e.g. ``"resnet8x4"``.
        teacher: the teacher architecture name (e.g. ``"resnet32x4"``) or a ready, trained ``nn.Module``.
        teacher_checkpoint: teacher weights (see ``lightning_methods.distillation.teacher``): a shared CIFAR-100
            teacher file / folder (``cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``), a lightning-methods
            ``.ckpt`` or the other sources ``load_teacher`` accepts. Required to fit when ``teacher`` is a name;
            ``None`` builds an untrained teacher, which is only useful to evaluate a distilled student
            (``load_from_checkpoint(ckpt, teacher_checkpoint=None)``).
        temperature: softmax temperature T of every distillation term.
        ce_weight: weight of the cross-entropy.
        logit_standardization: standardize both logits before the distillation terms (``LOGIT_STAND``).
        log_teacher_accuracy: log ``val/teacher_acc`` in the first validation epoch (a check of the teacher file).
        teacher_allow_pickle: explicit opt-in to unpickle arbitrary objects in the teacher file (``weights_only=False``;
            warns). Off by default: teacher files load with ``weights_only=True`` and can never run code.
        **kwargs: every argument of :class:`ImageClassifier` (``num_classes``, ``optimizer``, ``lr_scheduler``,
            ``grad_clip_norm``, ...), by keyword. ``optimizer=None`` means SGD lr 0.05, momentum 0.9, wd 5e-4
            (mdistiller's CIFAR-100 recipe).
    """

    #: whether the method's step needs :class:`lightning_methods.optim.DeepKD` (checked at ``configure_optimizers``)
    uses_deepkd_optimizer = False
    #: top-k of the NCKD mask (0 = all classes); DeepKD sets and schedules it
    topk = 0

    def __init__(
        self,
        backbone: str | nn.Module = "resnet8x4",
        teacher: str | nn.Module = "resnet32x4",
        teacher_checkpoint: str | None = None,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        logit_standardization: bool = False,
        log_teacher_accuracy: bool = True,
        teacher_allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        if type(self) is DistillationClassifier:
            raise TypeError("DistillationClassifier is the base of the distillation methods; use KDClassifier, "
                            "DKDClassifier, DeepKDClassifier or KDDeepKDClassifier (lightning_methods.distillation)")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(backbone=backbone, **kwargs)
        num_classes, channels_last = self.num_classes, self.channels_last
        ignore = [n for n, v in (("backbone", backbone), ("teacher", teacher)) if isinstance(v, nn.Module)]
        self.save_hyperparameters(ignore=ignore or None)
        self.temperature, self.ce_weight, self.logit_standardization = temperature, ce_weight, logit_standardization
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
    def distillation_terms(self, logits: torch.Tensor, teacher_logits: torch.Tensor,
                           target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's weighted per-sample terms (added to ``ce_weight * CE``), e.g. ``{"kd": ...}``."""
        raise NotImplementedError

    def prepared_logits(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher logits in at least float32 (a float64 model stays float64), standardized when
        ``logit_standardization``."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        s, t = logits.to(dtype), teacher_logits.to(dtype)
        if self.logit_standardization:
            s, t = standardize_logits(s), standardize_logits(t)
        return s, t

    def nckd_topk(self, num_classes: int) -> int | None:
        """The NCKD top-k in effect (``None``: all classes)."""
        return self.topk if 0 < self.topk < num_classes else None

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
            return super().training_step(batch, batch_idx)
        finally:
            self._teacher_cache = None

    def default_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def configure_optimizers(self) -> Any:
        out = super().configure_optimizers()
        optimizer = out["optimizer"] if isinstance(out, dict) else out
        if self.uses_deepkd_optimizer != isinstance(optimizer, DeepKD):
            need = "lightning_methods.optim.DeepKD" if self.uses_deepkd_optimizer else "an optimizer other than DeepKD"
            raise TypeError(f"{type(self).__name__} needs {need} as model.optimizer, got {type(optimizer).__name__}")
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
