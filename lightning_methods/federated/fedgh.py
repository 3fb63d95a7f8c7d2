"""FedGH: Yi et al., "FedGH: Heterogeneous Federated Learning with Generalized Global Header" (ACM MM 2023, arXiv
2303.13137), as implemented in HtFLlib (``clientgh.py`` / ``servergh.py``).

- Clients train their whole model with cross-entropy, then compute per-class mean features over their training set
  (eval mode) and upload them.
- The server trains a shared head ``Linear(512, num_classes)`` on the uploaded (prototype, class) pairs with
  cross-entropy and SGD (FedFree / HtFLlib: lr 0.01, one epoch, batch 10, shuffled), and every client replaces its
  head by the shared one.

Differences from HtFLlib (our choice): the server head starts from its own seeded initialisation (HtFLlib copies
client 0's initial head, which needs client weights on the server); prototypes use every training sample (HtFLlib's
loader drops the last incomplete batch); the server's shuffling is seeded by (seed, round, epoch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.federated.algorithm import (
    ClientData,
    ClientInfo,
    FedAlgorithm,
    FederationInfo,
    Payload,
    minibatch_sgd,
)
from lightning_methods.federated.client import FedClientModule
from lightning_methods.federated.fedproto import class_means
from lightning_methods.utils import seeded_generator


@torch.no_grad()
def collect_prototypes(net: nn.Module, data: ClientData, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean features of ``net`` (eval mode) over the client's training data; returns (protos, mask)."""
    was_training = net.training
    net.eval()
    sums = torch.zeros(num_classes, net.num_features, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for batch in data.train_loader():
        batch = data.preprocess({k: v.to(data.device) for k, v in batch.items()})
        y = batch["target"].cpu()
        sums.index_add_(0, y, net.forward_features(batch["image"]).double().cpu())
        counts += torch.bincount(y, minlength=num_classes)
    net.train(was_training)
    return class_means(sums, counts).float(), counts > 0


def train_head(head: nn.Linear, protos: torch.Tensor, labels: torch.Tensor, lr: float, epochs: int, batch_size: int,
              generator: torch.Generator) -> list[float]:
    """FedGH's server step: SGD on cross-entropy of ``head(prototype)``; returns the mean loss of each epoch."""
    return minibatch_sgd(head.parameters(), len(labels), lambda idx: F.cross_entropy(head(protos[idx]), labels[idx]),
                         lr=lr, epochs=epochs, batch_size=batch_size, generator=generator)


class FedGH(FedAlgorithm):
    """FedGH (see the module docstring).

    Args:
        server_lr: learning rate of the server's head training (FedFree / HtFLlib: 0.01).
        server_epochs: epochs over the uploaded prototypes per round (HtFLlib's tuned CIFAR setting: 1).
        server_batch_size: batch size of the server's head training (HtFLlib: the local batch size, 10).
    """

    name = "fedgh"

    def __init__(self, server_lr: float = 0.01, server_epochs: int = 1, server_batch_size: int = 10) -> None:
        if server_lr < 0 or server_epochs < 0 or server_batch_size < 1:
            raise ValueError("need server_lr >= 0, server_epochs >= 0 and server_batch_size >= 1")
        self.server_lr, self.server_epochs, self.server_batch_size = server_lr, server_epochs, server_batch_size

    def setup_server(self, info: FederationInfo) -> None:
        super().setup_server(info)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.global_seed())
            self.head = nn.Linear(info.feature_dim, info.num_classes)

    def server_state_dict(self) -> dict[str, Any]:
        return {"head": {k: v.clone() for k, v in self.head.state_dict().items()}}

    def load_server_state_dict(self, state: Mapping[str, Any]) -> None:
        self.head.load_state_dict(state["head"])

    def _head_payload(self) -> Payload:
        return Payload({k: v.detach().clone() for k, v in self.head.state_dict().items()})

    def initial_download(self, client: int) -> Payload | None:
        return self._head_payload()

    def aggregate(self, round: int, uploads: Mapping[int, Payload]) -> dict[str, Any]:
        protos, labels = [], []
        for cid in sorted(uploads):
            mask = uploads[cid].arrays["mask"]
            protos.append(uploads[cid].arrays["protos"][mask])
            labels.append(torch.nonzero(mask).flatten())
        losses = train_head(self.head, torch.cat(protos), torch.cat(labels), lr=self.server_lr,
                            epochs=self.server_epochs, batch_size=self.server_batch_size,
                            generator=seeded_generator(self.info.seed, round))
        self.pending = {c: self._head_payload() for c in range(self.info.num_clients)}
        return {"server/head_loss": losses[-1] if losses else 0.0,
                "server/prototypes": int(sum(len(p) for p in protos))}

    def apply_download(self, net: nn.Module, extra: dict[str, Any], payload: Payload, info: ClientInfo) -> None:
        net.head.load_state_dict(payload.arrays)

    def after_fit(self, module: FedClientModule, extra: dict[str, Any], info: ClientInfo, data: ClientData) -> None:
        extra["local_protos"], extra["local_mask"] = collect_prototypes(module.backbone, data, info.num_classes)

    def upload(self, before: Mapping[str, torch.Tensor], net: nn.Module, extra: dict[str, Any],
               info: ClientInfo) -> Payload:
        return Payload({"protos": extra.pop("local_protos"), "mask": extra.pop("local_mask")},
                       {"num_examples": info.num_examples})
