"""FedTGP: Zhang, Liu, Hua, Cao, "FedTGP: Trainable Global Prototypes with Adaptive-Margin-Enhanced Contrastive
Learning for Data and Model Heterogeneity in Federated Learning" (AAAI 2024, arXiv 2401.03230), as implemented in
HtFLlib (``clienttgp.py`` / ``servertgp.py``; HtFLlib is the authors' own library).

- Clients: FedProto's local objective ``CE + lambda * MSE(feature, global prototype of the label)`` (HtFLlib: lambda
  10); after training, the per-class mean feature over the training set in eval mode is uploaded (as in FedGH, not
  FedProto's running mean in train mode).
- Server: trainable global prototypes (TGP) ``P_c = fc(ReLU(W e_c + b))`` from a class embedding ``e_c`` (hidden
  width = feature width), trained by adaptive-margin-enhanced contrastive learning (ACL) on every uploaded
  (prototype, class) pair: cross-entropy over ``-(||p - P_c'|| + delta * [c' = y])``, where the margin ``delta =
  min(max_c gap_c, margin_threshold)`` and ``gap_c`` is the distance from the mean uploaded prototype of class ``c``
  (unweighted over the clients that have it) to the nearest other class's mean (classes without a neighbour take the
  smallest gap). SGD, ``server_epochs`` epochs of minibatches per round (HtFLlib: lr = the clients' lr 0.01, batch =
  the local batch 10, 100 epochs, margin threshold 100).
- Every client receives ``P_c`` of every class (eval mode); evaluation is the nearest global prototype in mean
  squared distance (FedProto's rule).

Differences from HtFLlib (our choices): the TGP starts from a seeded initialisation and the server's shuffling is
seeded by (seed, round); prototypes use every training sample (HtFLlib's loader drops the last incomplete batch);
the distance is the norm of the differences ``p - P_c`` (HtFLlib expands ``|p|^2 - 2 p.P + |P|^2``, which rounding
can make negative, and its square root then NaN; the norm's gradient is also finite where ``p = P_c``). The paper's
equations were not available offline; HtFLlib's numbers (golden values in the tests) define the behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.federated.algorithm import ClientData, ClientInfo, FederationInfo, Payload, minibatch_sgd
from lightning_methods.federated.client import FedClientModule
from lightning_methods.federated.fedgh import collect_prototypes
from lightning_methods.federated.fedproto import FedProto, FedProtoClientModule, aggregate_prototypes
from lightning_methods.utils import seeded_generator

#: a gap no class reaches: the mark of a class without a neighbour (HtFLlib: 1e9)
NO_GAP = float("inf")


class TrainableGlobalPrototypes(nn.Module):
    """``P_c = fc(ReLU(hidden(embedding(c))))``: one trainable prototype per class (HtFLlib's TGP)."""

    def __init__(self, num_classes: int, feature_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or feature_dim
        self.embedding = nn.Embedding(num_classes, feature_dim)
        self.hidden = nn.Linear(feature_dim, hidden_dim)
        self.fc = nn.Linear(hidden_dim, feature_dim)

    def forward(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Prototypes of ``classes`` (default: all), one row each."""
        emb = self.embedding.weight if classes is None else self.embedding(classes)
        return self.fc(F.relu(self.hidden(emb)))


def class_gaps(protos: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per class, the distance from its mean uploaded prototype to the nearest other class's; classes without a
    neighbour (absent, or the only class present) take the smallest gap (HtFLlib's ``receive_protos``)."""
    mean, present = aggregate_prototypes(list(protos), list(masks))
    mean = mean.to(torch.float64) if mean.dtype != torch.float64 else mean
    dist = torch.cdist(mean, mean, compute_mode="donot_use_mm_for_euclid_dist")
    pair = present.unsqueeze(0) & present.unsqueeze(1) & ~torch.eye(len(present), dtype=torch.bool)
    gap = torch.where(pair, dist, torch.full_like(dist, NO_GAP)).amin(dim=1)
    lonely = torch.isinf(gap)
    return torch.where(lonely, gap.min(), gap) if not bool(lonely.all()) else gap


def acl_margin(gaps: torch.Tensor, margin_threshold: float) -> float:
    """``min(max_c gap_c, margin_threshold)``: the adaptive margin (a federation with one class: the threshold)."""
    finite = gaps[torch.isfinite(gaps)]
    return min(float(finite.max()), margin_threshold) if finite.numel() else margin_threshold


def acl_loss(protos: torch.Tensor, labels: torch.Tensor, global_protos: torch.Tensor, margin: float) -> torch.Tensor:
    """Adaptive-margin-enhanced contrastive loss: the mean cross-entropy of ``-(||p - P_c|| + margin [c = y])``."""
    dist = torch.linalg.vector_norm(protos.unsqueeze(1) - global_protos.unsqueeze(0), dim=-1)  # zero-safe gradient
    dist = dist + margin * F.one_hot(labels, global_protos.shape[0]).to(dist)
    return F.cross_entropy(-dist, labels)


def train_tgp(tgp: TrainableGlobalPrototypes, protos: torch.Tensor, labels: torch.Tensor, margin: float, lr: float,
              epochs: int, batch_size: int, generator: torch.Generator) -> list[float]:
    """FedTGP's server step: SGD on :func:`acl_loss` over the uploaded pairs; returns each epoch's mean loss."""
    tgp.train()
    return minibatch_sgd(tgp.parameters(), len(labels), lambda idx: acl_loss(protos[idx], labels[idx], tgp(), margin),
                         lr=lr, epochs=epochs, batch_size=batch_size, generator=generator)


class FedTGPClientModule(FedProtoClientModule):
    """FedProto's local objective; no running prototypes (FedTGP collects them after training, in eval mode)."""

    def observe(self, batch: Mapping[str, torch.Tensor], features: torch.Tensor) -> None:
        pass


class FedTGP(FedProto):
    """FedTGP (see the module docstring).

    Args:
        lamda: weight of the clients' prototype term (HtFLlib: 10).
        server_lr: SGD learning rate of the TGP (HtFLlib: the clients' lr, 0.01).
        server_epochs: epochs over the uploaded prototypes per round (HtFLlib: 100).
        server_batch_size: minibatch of the TGP training (HtFLlib: the local batch size, 10).
        margin_threshold: the cap ``tau`` of the adaptive margin (HtFLlib / FedFree: 100).
    """

    name = "fedtgp"
    client_module = FedTGPClientModule

    def __init__(self, lamda: float = 10.0, server_lr: float = 0.01, server_epochs: int = 100,
                 server_batch_size: int = 10, margin_threshold: float = 100.0) -> None:
        super().__init__(lamda)
        checks = {"server_lr": server_lr > 0, "server_epochs": server_epochs >= 0,
                  "server_batch_size": server_batch_size >= 1, "margin_threshold": margin_threshold >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"FedTGP {name}={locals()[name]!r} is out of range: need server_lr > 0, "
                                 "server_epochs >= 0, server_batch_size >= 1 and margin_threshold >= 0")
        self.server_lr, self.server_epochs, self.server_batch_size = server_lr, server_epochs, server_batch_size
        self.margin_threshold = margin_threshold

    def setup_server(self, info: FederationInfo) -> None:
        super().setup_server(info)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.global_seed())
            self.tgp = TrainableGlobalPrototypes(info.num_classes, info.feature_dim)

    def server_state_dict(self) -> dict[str, Any]:
        return {**super().server_state_dict(), "tgp": {k: v.clone() for k, v in self.tgp.state_dict().items()}}

    def load_server_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_server_state_dict(state)
        self.tgp.load_state_dict(state["tgp"])

    def aggregate(self, round: int, uploads: Mapping[int, Payload]) -> dict[str, Any]:
        clients = sorted(uploads)
        protos = [uploads[c].arrays["protos"] for c in clients]
        masks = [uploads[c].arrays["mask"] for c in clients]
        gaps = class_gaps(protos, masks)
        margin = acl_margin(gaps, self.margin_threshold)
        pairs = torch.cat([p[m] for p, m in zip(protos, masks)])
        labels = torch.cat([torch.nonzero(m).flatten() for m in masks])
        dtype = next(self.tgp.parameters()).dtype
        losses = train_tgp(self.tgp, pairs.to(dtype), labels, margin, lr=self.server_lr, epochs=self.server_epochs,
                           batch_size=self.server_batch_size, generator=seeded_generator(self.info.seed, round))
        self.tgp.eval()
        with torch.no_grad():
            self.protos = self.tgp().detach().clone()
        self.mask = torch.ones(self.info.num_classes, dtype=torch.bool)
        self.pending = {c: Payload({"protos": self.protos, "mask": self.mask}) for c in range(self.info.num_clients)}
        finite = gaps[torch.isfinite(gaps)]
        return {"server/tgp_loss": losses[-1] if losses else 0.0, "server/margin": margin,
                "server/min_gap": float(finite.min()) if finite.numel() else 0.0, "server/prototypes": len(labels)}

    def after_fit(self, module: FedClientModule, extra: dict[str, Any], info: ClientInfo, data: ClientData) -> None:
        extra["local_protos"], extra["local_mask"] = collect_prototypes(module.backbone, data, info.num_classes)
