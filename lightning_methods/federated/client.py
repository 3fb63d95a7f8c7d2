"""Local training and evaluation of one client: the LightningModule a quiet Trainer fits for one client-round.

:class:`FedClientModule` is an :class:`~lightning_methods.ImageClassifier` over a client network with the common
512-d feature + head interface (:class:`~lightning_methods.models.fed_clients.FedClientNet`), trained with plain
SGD (FedFree / HtFLlib: lr 0.01, no momentum, no weight decay). Algorithms add a loss term through
:meth:`FedClientModule.regularizer` (FedProx, FedProto) and observe features through
:meth:`FedClientModule.observe` (FedProto's local prototypes). The optimizer state can be carried across rounds
(``initial_optimizer_state``); by default it is not (the papers re-create the optimizer every round).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_methods.classifier import ImageClassifier


class FedClientModule(ImageClassifier):
    """One client's local update: cross-entropy (+ the algorithm's term) with SGD.

    Args:
        backbone: the client network (``forward_features`` -> 512-d, ``head`` -> logits).
        num_classes: number of classes.
        lr: local learning rate (FedFree Table A2: 0.01).
        momentum: SGD momentum (0 in FedFree / HtFLlib).
        weight_decay: SGD weight decay (0 in FedFree / HtFLlib).
        **kwargs: further :class:`ImageClassifier` arguments (``grad_clip_norm``, ``channels_last``, ...).
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 100, lr: float = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, **kwargs: Any) -> None:
        for attr in ("forward_features", "head"):
            if not hasattr(backbone, attr):
                raise TypeError(f"{type(backbone).__name__} has no {attr!r}: federated clients need the 512-d "
                                "feature + head interface (lightning_methods.models.fed_clients.FedClientNet)")
        kwargs.setdefault("optimizer", partial(torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=weight_decay))
        super().__init__(backbone=backbone, num_classes=num_classes, **kwargs)
        self.initial_optimizer_state: dict | None = None

    # ------------------------------------------------------------------------------------------ hooks
    def regularizer(self, batch: Mapping[str, torch.Tensor], features: torch.Tensor,
                    logits: torch.Tensor) -> torch.Tensor | None:
        """Extra loss per sample (or a scalar, broadcast) added to the cross-entropy; ``None`` for none."""
        return None

    def observe(self, batch: Mapping[str, torch.Tensor], features: torch.Tensor) -> None:
        """Called once per training step (first closure call) with the detached features."""

    # ------------------------------------------------------------------------------------------ training
    def forward_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_features(batch["image"])
        logits = self.backbone.head(features)
        loss = self.per_sample_loss(logits, batch)
        extra = self.regularizer(batch, features, logits)
        if extra is not None:
            loss = loss + extra
        if self.closure_call == 0:
            self.observe(batch, features.detach())
        return loss, logits

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.initial_optimizer_state is not None:
            self._optimizers()[0].load_state_dict(self.initial_optimizer_state)

    def optimizer_state(self) -> dict:
        """The optimizer's state after fitting, on the CPU (to carry it to the next round)."""
        return _to_cpu(self._optimizers()[0].state_dict())


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


@torch.no_grad()
def evaluate_client(predict: Callable[[torch.Tensor], torch.Tensor], loader: Any,
                    preprocess: Callable[[dict], dict], device: torch.device | str = "cpu") -> tuple[int, int]:
    """``(correct, total)`` of ``predict`` (images -> class scores, argmax wins) over a loader of dict batches.

    Args:
        predict: scores for a batch of preprocessed images (the network, or FedProto's prototype distances).
        loader: yields the package's dict batches (uint8 images).
        preprocess: device-side preprocessing of a batch (the DataModule's ``normalize_batch``).
        device: where to evaluate.
    """
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for batch in loader:
        batch = preprocess({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        scores = predict(batch["image"])
        correct += (scores.argmax(dim=1) == batch["target"]).sum()
        total += int(batch["target"].shape[0])
    return int(correct), total
