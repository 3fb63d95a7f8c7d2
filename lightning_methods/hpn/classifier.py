"""HPNClassifier: classification by fixed hyperspherical prototypes and a squared-cosine loss.

Mettes, van der Pol, Snoek. *Hyperspherical Prototype Networks*. NeurIPS 2019, arXiv 1901.10514.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from lightning_methods.classifier import ImageClassifier, as_dict_batch
from lightning_methods.hpn.base import (
    LossScaleMixin,
    Reduction,
    SumScope,
    at_least_float32,
    output_backbone,
)
from lightning_methods.hpn.prototypes import build_prototypes, load_prototypes
from lightning_methods.losses.hpn import hpn_classification_loss, prototype_cosines

PrototypeSource = Literal["auto", "checkpoint"]


class HPNClassifier(LossScaleMixin, ImageClassifier):
    """An ``ImageClassifier`` whose backbone outputs a D-dimensional vector that is pulled towards the fixed unit
    prototype of its class with ``L_c = sum (1 - cos(o, p_y))^2``; the class scores ("logits") are the cosines to
    all K prototypes, so top-1 / top-5 are the nearest prototypes in cosine.

    The prototypes are a buffer (saved in checkpoints, never trained). They come from ``prototype_file`` (a (K, D)
    ``.npy`` from ``lightning-methods prototypes``), or are optimised on the fly (seeded, memoised per process) with
    the official settings. Under DDP, DDP broadcasts them from rank 0 when it wraps the model. A checkpoint records
    ``prototype_source="checkpoint"``, so ``load_from_checkpoint`` takes them from the checkpoint without the file
    or a new optimisation.

    Args:
        prototype_dims: output dimension D (the paper: 10, 25, 50, 100 on CIFAR-100).
        prototype_file: (K, D) ``.npy`` prototypes; ``None`` builds them on the fly.
        prototype_seed: seed of the on-the-fly optimisation (official 300).
        prototype_iterations: SGD steps of the on-the-fly optimisation (official 10,000).
        prototype_persistent_momentum: ``False`` = official update (no effective momentum); ``True`` keeps a
            momentum-0.9 buffer across steps.
        class_embeddings: optional (K, E) class-embedding file (word2vec etc.) for the semantic-prior term of the
            on-the-fly optimisation.
        semantic_neighbours: nearest classes per class in the semantic-prior ranking term.
        reduction: ``"sum"`` over the batch (official; lr 0.01 is tuned for it) or ``"mean"`` (warns).
        sum_scope: with ``"sum"``: ``"device"`` sums each rank's batch (DDP's gradient average makes the step that
            of the per-device batch) or ``"global"`` (the step of one process with the whole global batch).
        cosine_eps: eps of the cosine (official 1e-9).
        prototype_source: ``"auto"`` (file or on-the-fly); ``"checkpoint"`` is written by checkpoints: the buffer
            is allocated empty and must be filled by ``load_state_dict``.
        backbone: backbone name (its output size is set to D) or a module that outputs D values.
        **kwargs: the ``ImageClassifier`` arguments (``num_classes`` = K, ``optimizer``, ``lr_scheduler``, ...).
            ``optimizer=None`` means the official SGD(lr 0.01, momentum 0.9, weight decay 1e-4), not the base's
            default; ``label_smoothing`` must stay 0.

    Raises:
        ValueError: ``prototype_dims < 2``, a prototype file of the wrong shape, label smoothing, bad reduction.
        FileNotFoundError: a missing prototype or class-embedding file.
    """

    def __init__(
        self,
        prototype_dims: int = 100,
        prototype_file: str | None = None,
        prototype_seed: int = 300,
        prototype_iterations: int = 10_000,
        prototype_persistent_momentum: bool = False,
        class_embeddings: str | None = None,
        semantic_neighbours: int = 5,
        reduction: Reduction = "sum",
        sum_scope: SumScope = "device",
        cosine_eps: float = 1e-9,
        prototype_source: PrototypeSource = "auto",
        backbone: str | nn.Module = "hpn_resnet32",
        **kwargs: Any,
    ) -> None:
        if prototype_dims < 2:
            raise ValueError(f"prototype_dims must be >= 2, got {prototype_dims}")
        if prototype_source not in ("auto", "checkpoint"):
            raise ValueError(f"prototype_source must be 'auto' or 'checkpoint', got {prototype_source!r}")
        net = output_backbone(backbone, self.output_dims(prototype_dims), kwargs.get("backbone_kwargs"))
        super().__init__(backbone=net, **kwargs)
        # the base saved hparams without the backbone (it received a module): save the signature of this class
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if self.label_smoothing:
            raise ValueError("HPN has no label smoothing (its loss is a cosine to one prototype); set it to 0")
        self._init_loss_scale(reduction, sum_scope, cosine_eps)
        self.prototype_dims = prototype_dims
        k = self.num_classes
        if prototype_source == "checkpoint":
            protos = torch.zeros(k, prototype_dims)
        elif prototype_file:
            protos = load_prototypes(prototype_file, k, prototype_dims)
        else:
            protos = build_prototypes(k, prototype_dims, prototype_iterations, seed=prototype_seed,
                                      persistent_momentum=prototype_persistent_momentum,
                                      embeddings_file=class_embeddings, neighbours=semantic_neighbours)
        self.register_buffer("prototypes", protos)
        self._prototypes_ready = prototype_source == "auto"
        self.register_load_state_dict_pre_hook(_mark_prototypes_loaded)

    def output_dims(self, prototype_dims: int) -> int:
        """Backbone output size for ``prototype_dims`` (subclasses add regression dimensions; runs before
        ``nn.Module.__init__``, so it may read only plain attributes set before ``super().__init__``)."""
        return prototype_dims

    # --------------------------------------------------------------------------------------------- loss / scores
    def _check_ready(self) -> None:
        if not self._prototypes_ready:
            raise RuntimeError("the prototypes of this HPN model were never loaded (prototype_source='checkpoint' "
                               "expects load_state_dict / load_from_checkpoint); use prototype_source='auto'")

    def class_output(self, output: torch.Tensor) -> torch.Tensor:
        """The part of the network output compared with the class prototypes (all of it here)."""
        return output

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        """(B, K) cosines to every prototype: the logits of the accuracy metrics."""
        self._check_ready()
        return prototype_cosines(self.class_output(output), self.prototypes)

    def per_sample_loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError("HPNClassifier computes its loss from the network output in forward_loss")

    def hpn_losses(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unscaled per-sample loss terms; ``"loss"`` is the training objective per sample."""
        if "soft_target" in batch:
            raise ValueError("HPN cannot train on soft targets (CutMix / MixUp): set cutmix_alpha and mixup_alpha to 0")
        self._check_ready()
        loss = hpn_classification_loss(self.class_output(output), self.prototypes, batch["target"], "none",
                                       self.cosine_eps)
        return {"loss": loss}

    def forward_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        output = self(batch["image"])
        losses = self.hpn_losses(output, batch)
        self.after_train_forward(output, batch, losses)
        with torch.no_grad():  # the scores only feed the training metrics
            scores = self.scores(output.detach())
        return losses["loss"] * self.loss_scale(output.shape[0]), scores

    def after_train_forward(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor],
                            losses: dict[str, torch.Tensor]) -> None:
        """Hook for subclasses (extra training metrics of the first closure call)."""

    # --------------------------------------------------------------------------------------------- evaluation
    def _hpn_eval_step(self, batch: Any, stage: str) -> None:
        batch = as_dict_batch(batch)
        output = self(batch["image"])
        losses = self.hpn_losses(output, batch)
        n = output.shape[0]
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(self.scores(output), batch["target"])
        self.log(f"{stage}/loss", losses.pop("loss").mean(), on_epoch=True, prog_bar=stage == "val", batch_size=n,
                 sync_dist=True)
        for key, value in losses.items():
            self.log(f"{stage}/{key}", value.mean(), on_epoch=True, batch_size=n, sync_dist=True)
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=n)
        self.after_eval_forward(output, batch, stage)

    def after_eval_forward(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor], stage: str) -> None:
        """Hook for subclasses (extra evaluation metrics)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._hpn_eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._hpn_eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        batch = as_dict_batch(batch)
        output = self(batch["image"])
        cosines = self.scores(output)
        conf, pred = cosines.max(dim=-1)
        out = {"pred": pred, "confidence": conf, "cosines": cosines, "output": at_least_float32(output)}
        for key in ("index", "target"):
            if key in batch:
                out[key] = batch[key]
        return out

    # --------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if "hyper_parameters" in checkpoint:  # load_from_checkpoint takes the prototypes from the state dict
            checkpoint["hyper_parameters"]["prototype_source"] = "checkpoint"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("state_dict") or {}).get("prototypes")
        if saved is None:
            raise KeyError("this checkpoint has no 'prototypes' buffer: it was not written by an HPN module")
        if tuple(saved.shape) != tuple(self.prototypes.shape):
            raise ValueError(f"checkpoint prototypes have shape {tuple(saved.shape)}, this model "
                             f"{tuple(self.prototypes.shape)} (classes, dims): set num_classes / prototype_dims")
        if self._prototypes_ready and not torch.equal(saved.to(self.prototypes), self.prototypes):
            warnings.warn("the checkpoint's prototypes differ from those built from this configuration; the "
                          "checkpoint's are used (the network was trained against them)", stacklevel=2)


def _mark_prototypes_loaded(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    if prefix + "prototypes" in state_dict:
        module._prototypes_ready = True
