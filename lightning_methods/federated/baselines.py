"""Homogeneous-FL baselines of FedFree's Table 1: FedAvg and FedProx (every client has the same architecture).

- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data" (arXiv
  1602.05629). The server averages the client models weighted by their training-set sizes (PFLlib's
  ``aggregate_parameters``: parameters; here floating-point buffers such as BatchNorm statistics too, integer
  buffers are taken from the first client) and every client continues from the average.
- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks" (arXiv 1812.06127): FedAvg whose local
  objective adds ``mu / 2 * ||w - w_global||^2`` (PFLlib's ``PerturbedGradientDescent``; FedFree: mu = 0.01).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_methods.federated.algorithm import (
    ClientInfo,
    FedAlgorithm,
    FederationInfo,
    Payload,
    build_net,
    cpu_state,
)
from lightning_methods.federated.client import FedClientModule


class FedAvg(FedAlgorithm):
    """FedAvg (see the module docstring). Clients start from the server's initial global model."""

    name = "fedavg"
    same_architecture = True

    def setup_server(self, info: FederationInfo) -> None:
        super().setup_server(info)
        families = sorted(set(info.families))
        if len(families) != 1:
            raise ValueError(f"{type(self).__name__} averages whole models and needs one client family; got "
                             f"{families}. Use it in the homogeneous setting (federation.families: [fed_cnn]).")
        self.global_state = cpu_state(build_net(families[0], info, self.global_seed(), info.feature_dim, info.stem))

    def server_state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state}

    def load_server_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_state = {k: v.clone() for k, v in state["global_state"].items()}

    def initial_download(self, client: int) -> Payload | None:
        return Payload(dict(self.global_state))

    def aggregate(self, round: int, uploads: Mapping[int, Payload]) -> dict[str, Any]:
        clients = sorted(uploads)
        weights = torch.tensor([float(uploads[c].meta["num_examples"]) for c in clients], dtype=torch.float64)
        weights = weights / weights.sum()
        new = {}
        for key, value in self.global_state.items():
            if value.is_floating_point():
                acc = sum(w * uploads[c].arrays[key].double() for w, c in zip(weights.tolist(), clients))
                new[key] = acc.to(value.dtype)
            else:
                new[key] = uploads[clients[0]].arrays[key].clone()
        self.global_state = new
        self.pending = {c: Payload(dict(new)) for c in range(self.info.num_clients)}
        return {}

    def apply_download(self, net: nn.Module, extra: dict[str, Any], payload: Payload, info: ClientInfo) -> None:
        net.load_state_dict(payload.arrays, strict=True)

    def upload(self, before: Mapping[str, torch.Tensor], net: nn.Module, extra: dict[str, Any],
               info: ClientInfo) -> Payload:
        return Payload(cpu_state(net), {"num_examples": info.num_examples})


class FedProxClientModule(FedClientModule):
    """Local update with the proximal term ``mu / 2 * ||w - w_start||^2`` (``w_start``: the weights the round starts
    from, i.e. the global model just received)."""

    def __init__(self, backbone: nn.Module, mu: float = 0.01, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.mu = mu
        self.anchor: list[torch.Tensor] = []

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.anchor = [p.detach().clone() for p in self.backbone.parameters()]

    def regularizer(self, batch: Any, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        prox = sum((p - a).pow(2).sum() for p, a in zip(self.backbone.parameters(), self.anchor))
        return 0.5 * self.mu * prox


class FedProx(FedAvg):
    """FedProx (see the module docstring).

    Args:
        mu: weight of the proximal term (FedFree: 0.01).
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def make_module(self, net: nn.Module, extra: dict[str, Any], info: ClientInfo) -> FedClientModule:
        return FedProxClientModule(net, mu=self.mu, num_classes=info.num_classes, lr=info.lr,
                                   momentum=info.momentum, weight_decay=info.weight_decay)
