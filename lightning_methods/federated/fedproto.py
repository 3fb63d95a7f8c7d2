"""FedProto: Tan et al., "FedProto: Federated Prototype Learning across Heterogeneous Clients" (AAAI 2022, arXiv
2105.00243), as implemented in HtFLlib (``clientproto.py`` / ``serverproto.py``).

- Local objective: ``CE + lambda * MSE(feature, global prototype of the label)``; the MSE is an elementwise mean over
  the batch, samples whose class has no global prototype contribute 0 (HtFLlib substitutes the detached feature).
- Local prototypes: the mean feature of each class over every training batch of the round (train mode, before each
  step), uploaded after training.
- Server: a global prototype per class = the unweighted mean of the clients' prototypes of that class.
- Evaluation: the nearest global prototype in mean squared distance (classes without a prototype never win).

FedFree's settings: lambda = 10 (HtFLlib default 1; FedFree lists "proto-lr 0.1, lambda = 10").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_methods.federated.algorithm import ClientData, ClientInfo, FedAlgorithm, FederationInfo, Payload
from lightning_methods.federated.client import FedClientModule


def class_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-class mean features (rows of classes without samples are 0)."""
    return sums / counts.clamp_min(1).unsqueeze(1).to(sums)


def aggregate_prototypes(protos: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted mean over the clients that have each class; returns (prototypes, has-prototype mask)."""
    stacked, mask = torch.stack(protos).double(), torch.stack(masks).to(torch.float64)
    counts = mask.sum(0)
    mean = (stacked * mask.unsqueeze(-1)).sum(0) / counts.clamp_min(1).unsqueeze(1)
    return mean.to(protos[0].dtype), counts > 0


def prototype_scores(features: torch.Tensor, protos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``-MSE(feature, prototype)`` for every class; ``-inf`` for classes without a prototype."""
    dist = (features.unsqueeze(1) - protos.unsqueeze(0).to(features)).pow(2).mean(-1)
    return torch.where(mask.to(features.device).unsqueeze(0), -dist, torch.full_like(dist, float("-inf")))


class FedProtoClientModule(FedClientModule):
    """Local update with the prototype term; accumulates per-class feature sums for the local prototypes."""

    def __init__(self, backbone: nn.Module, lamda: float = 10.0, num_classes: int = 100, **kwargs: Any) -> None:
        super().__init__(backbone, num_classes=num_classes, **kwargs)
        self.lamda = lamda
        self.global_protos: torch.Tensor | None = None
        self.global_mask: torch.Tensor | None = None
        self.proto_sums = torch.zeros(num_classes, backbone.num_features, dtype=torch.float64)
        self.proto_counts = torch.zeros(num_classes, dtype=torch.long)

    def regularizer(self, batch: Mapping[str, torch.Tensor], features: torch.Tensor,
                    logits: torch.Tensor) -> torch.Tensor | None:
        if self.global_protos is None or self.lamda == 0:
            return None
        y = batch["target"]
        has = self.global_mask.to(y.device)[y]
        target = self.global_protos.to(features)[y]
        per_sample = (features - target).pow(2).mean(-1)
        return self.lamda * torch.where(has, per_sample, torch.zeros_like(per_sample))

    def observe(self, batch: Mapping[str, torch.Tensor], features: torch.Tensor) -> None:
        if self.proto_sums.device != features.device:  # accumulate on the training device (no per-step sync)
            self.proto_sums, self.proto_counts = self.proto_sums.to(features.device), self.proto_counts.to(
                features.device)
        y = batch["target"]
        self.proto_sums.index_add_(0, y, features.double())
        self.proto_counts += torch.bincount(y, minlength=self.proto_counts.numel())


class FedProto(FedAlgorithm):
    """FedProto (see the module docstring).

    Args:
        lamda: weight of the prototype term (FedFree / HtFLlib tuned: 10).
    """

    name = "fedproto"
    #: the clients' LightningModule (FedTGP: the same objective without the running prototypes)
    client_module: type[FedProtoClientModule] = FedProtoClientModule

    def __init__(self, lamda: float = 10.0) -> None:
        if lamda < 0:
            raise ValueError(f"FedProto lamda must be >= 0, got {lamda}")
        self.lamda = lamda

    def setup_server(self, info: FederationInfo) -> None:
        super().setup_server(info)
        self.protos = torch.zeros(info.num_classes, info.feature_dim)
        self.mask = torch.zeros(info.num_classes, dtype=torch.bool)

    def server_state_dict(self) -> dict[str, Any]:
        return {"protos": self.protos, "mask": self.mask}

    def load_server_state_dict(self, state: Mapping[str, Any]) -> None:
        self.protos, self.mask = state["protos"].clone(), state["mask"].clone()

    def aggregate(self, round: int, uploads: Mapping[int, Payload]) -> dict[str, Any]:
        clients = sorted(uploads)
        self.protos, self.mask = aggregate_prototypes([uploads[c].arrays["protos"] for c in clients],
                                                      [uploads[c].arrays["mask"] for c in clients])
        self.pending = {c: Payload({"protos": self.protos, "mask": self.mask}) for c in range(self.info.num_clients)}
        return {"server/classes_with_prototype": int(self.mask.sum())}

    def apply_download(self, net: nn.Module, extra: dict[str, Any], payload: Payload, info: ClientInfo) -> None:
        extra["protos"], extra["mask"] = payload.arrays["protos"].clone(), payload.arrays["mask"].clone()

    def make_module(self, net: nn.Module, extra: dict[str, Any], info: ClientInfo) -> FedClientModule:
        module = self.client_module(net, lamda=self.lamda, num_classes=info.num_classes, lr=info.lr,
                                    momentum=info.momentum, weight_decay=info.weight_decay)
        if "protos" in extra:
            module.global_protos, module.global_mask = extra["protos"], extra["mask"]
        return module

    def after_fit(self, module: FedClientModule, extra: dict[str, Any], info: ClientInfo, data: ClientData) -> None:
        extra["local_protos"] = class_means(module.proto_sums, module.proto_counts).float().cpu()
        extra["local_mask"] = (module.proto_counts > 0).cpu()

    def upload(self, before: Mapping[str, torch.Tensor], net: nn.Module, extra: dict[str, Any],
               info: ClientInfo) -> Payload:
        return Payload({"protos": extra.pop("local_protos"), "mask": extra.pop("local_mask")},
                       {"num_examples": info.num_examples})

    def predictor(self, net: nn.Module, extra: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        if "protos" not in extra:
            return net
        return lambda x: prototype_scores(net.forward_features(x), extra["protos"], extra["mask"])
