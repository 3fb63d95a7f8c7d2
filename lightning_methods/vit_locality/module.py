"""ViTLocalityClassifier and the protocol conditions of "Inducing Spatial Locality in Vision Transformers through the
Training Protocol" (Santiago Toledo and Martinez, arXiv 2605.16390).

The paper keeps architecture and optimisation fixed and changes only the data/label pipeline. The three components are
independent switches of the existing package parts:

- colour augmentation: ``data.init_args.augment: autoaugment`` (CIFAR-10 policy) or ``colorjitter`` (0.4, 0.4, 0.4),
  per sample in DataLoader workers on uint8 images, before the on-device crop + flip;
- CutMix: ``data.init_args.cutmix_alpha: 1.0`` (p = 1), batched on the device after crop + flip, adding a
  ``soft_target`` with the exact kept-area fraction;
- label smoothing: ``model.init_args.label_smoothing: 0.1`` (also applied to CutMix's soft targets).

Baseline has none of them, Modern all three; the ablation adds one to Baseline or removes one from Modern.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_methods.classifier import ImageClassifier, as_dict_batch

#: The eight conditions of the CIFAR-100 ablation, in the paper's reading order.
CONDITIONS: tuple[str, ...] = ("Baseline", "Baseline+AA", "Baseline+CutMix", "Baseline+LS", "Modern-AA",
                               "Modern-CutMix", "Modern-LS", "Modern")
_NAMES = ("AA", "CutMix", "LS")


def protocol_name(color_aug: bool, cutmix: bool, label_smoothing: bool) -> str:
    """Condition name of a combination of the three components (e.g. ``"Baseline+CutMix"``, ``"Modern-LS"``)."""
    on = (bool(color_aug), bool(cutmix), bool(label_smoothing))
    if sum(on) == 0:
        return "Baseline"
    if sum(on) == 3:
        return "Modern"
    if sum(on) == 1:
        return "Baseline+" + _NAMES[on.index(True)]
    return "Modern-" + _NAMES[on.index(False)]


def protocol_components(model_hparams: Mapping[str, Any], data_hparams: Mapping[str, Any]) -> dict[str, bool]:
    """The three switches read from a checkpoint's model and DataModule hyperparameters."""
    return {
        "color_aug": data_hparams.get("augment") in ("autoaugment", "colorjitter"),
        "cutmix": float(data_hparams.get("cutmix_alpha") or 0.0) > 0,
        "label_smoothing": float(model_hparams.get("label_smoothing") or 0.0) > 0,
    }


def dominant_label(soft_target: torch.Tensor) -> torch.Tensor:
    """The class with the largest mass in each soft target (CutMix: the label of the larger image region)."""
    return soft_target.argmax(dim=-1)


class ViTLocalityClassifier(ImageClassifier):
    """ImageClassifier for the locality study: a ViT-Lite backbone and an honest training accuracy under CutMix.

    Under CutMix the hard ``target`` is the label of the image the box is pasted into, which may cover the smaller
    part of the picture; training accuracy is therefore measured against the dominant label (largest soft-target
    mass) and logged as ``train/acc_dominant`` / ``train/acc_top5_dominant`` (equal to the usual accuracy when no
    mixing happens, so all eight conditions log the same keys). Validation and test accuracy use the hard labels.

    Args:
        backbone: a registered name (default ``vit_lite_7_4``; ``vit_lite_7_8`` for 64x64 Tiny-ImageNet), any timm
            ViT name (``backbone_kwargs`` such as ``img_size``/``patch_size``), or a module.
        **kwargs: the :class:`~lightning_methods.ImageClassifier` arguments (optimizer, lr_scheduler,
            label_smoothing, no_weight_decay_roles, ...).
    """

    def __init__(self, backbone: str | nn.Module = "vit_lite_7_4", **kwargs: Any) -> None:
        super().__init__(backbone=backbone, **kwargs)
        self.train_metrics = self.train_metrics.clone(postfix="_dominant")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch = as_dict_batch(batch)
        if "soft_target" in batch:  # the loss reads soft_target; "target" only feeds the training metrics
            batch = {**batch, "target": dominant_label(batch["soft_target"])}
        return super().training_step(batch, batch_idx)
