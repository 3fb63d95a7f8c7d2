"""Homogeneous-FL baselines of FedFree's Table 1: FedAvg, FedProx and Per-FedAvg (every client has the same
architecture; pFedLA, the fourth, is in :mod:`.pfedla`).

- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data" (arXiv
  1602.05629). The server averages the client models weighted by their training-set sizes (PFLlib's
  ``aggregate_parameters``: parameters; here floating-point buffers such as BatchNorm statistics too, integer
  buffers are taken from the first client) and every client continues from the average.
- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks" (arXiv 1812.06127): FedAvg whose local
  objective adds ``mu / 2 * ||w - w_global||^2`` (PFLlib's ``PerturbedGradientDescent``; FedFree: mu = 0.01).
- Per-FedAvg: Fallah, Mokhtari, Ozdaglar, "Personalized Federated Learning with Theoretical Guarantees: A
  Model-Agnostic Meta-Learning Approach" (NeurIPS 2020, arXiv 2002.07948), its first-order version (Per-FedAvg (FO),
  as PFLlib implements it): each local step takes two batches ``D``, ``D'`` and sets ``w <- w - beta grad f(w -
  alpha grad f(w; D); D')`` (``alpha``: the clients' lr, FedFree 0.01; ``beta``: FedFree 0.01); the server averages
  as FedAvg. A client's model is the global model after one step ``w - alpha grad f(w; D)`` on one of its training
  batches: each evaluation adapts the global model so, then tests it (PFLlib's ``evaluate_one_step``).

  Per-FedAvg details. The two batches of a step are consecutive batches of the client's loader (PFLlib splits one
  batch of twice the size: the same samples per step and the same number of steps, ``floor(n / 2B)``). The
  adaptation batch of an evaluation is drawn by (seed, round, client), without augmentation. PFLlib's server calls
  each client's ``train()`` twice per round, i.e. runs twice the configured local epochs: to reproduce its schedule
  set ``federation.local_epochs`` to twice its value. The Hessian-free variant Per-FedAvg (HF) is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.classifier import as_dict_batch
from lightning_methods.federated.algorithm import (
    ClientData,
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


class PerFedAvgClientModule(FedClientModule):
    """Per-FedAvg (FO)'s local step over pairs of consecutive batches: the first (``D``) takes the inner step with
    the optimizer's lr ``alpha``, the gradient on the second (``D'``) at the adapted weights is applied to the
    weights from before the inner step with lr ``beta`` (an unpaired last batch of an epoch is not used)."""

    def __init__(self, backbone: nn.Module, beta: float = 0.01, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.beta = beta
        self.support: dict[str, torch.Tensor] | None = None

    def on_train_epoch_start(self) -> None:
        self.support = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        batch = as_dict_batch(batch)
        if self.support is None:
            self.support = batch
            return None
        support, self.support = self.support, None
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        self.step_with_closure(support)  # w_tmp = w - alpha grad f(w; D)
        opt = self.optimizers()
        closure = self.make_closure(batch, opt)
        gradient_at_adapted = closure.run

        def then_restore(c: Any, call: int) -> torch.Tensor:  # grad f(w_tmp; D'), then the weights back to w
            losses = gradient_at_adapted(c, call)
            with torch.no_grad():
                for p, w in zip(params, start):
                    p.copy_(w)
            return losses

        closure.run = then_restore
        groups = self._optimizers()[0].param_groups
        alphas = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = self.beta
        try:  # w <- w - beta grad f(w_tmp; D')
            opt.step(closure=closure)
        finally:
            for group, lr in zip(groups, alphas):
                group["lr"] = lr
            self.closure_call = 0
        self.log_training_step(batch, closure)
        return closure.first_loss


class PerFedAvg(FedAvg):
    """Per-FedAvg, first-order version (see the module docstring).

    Args:
        beta: the outer (meta) step size (FedFree: 0.01). The inner step size ``alpha`` is the clients' learning rate
            (``federation.lr``), as in PFLlib.
    """

    name = "perfedavg"

    def __init__(self, beta: float = 0.01) -> None:
        if not beta > 0:
            raise ValueError(f"Per-FedAvg beta={beta!r}: the outer step size must be > 0 (FedFree: 0.01)")
        self.beta = beta

    def validate_client(self, net: nn.Module, info: ClientInfo) -> None:
        if info.momentum or info.weight_decay:
            raise ValueError(f"Per-FedAvg takes plain SGD steps (PFLlib's PerAvgOptimizer); federation.momentum="
                             f"{info.momentum:g} and federation.weight_decay={info.weight_decay:g} must be 0")

    def make_module(self, net: nn.Module, extra: dict[str, Any], info: ClientInfo) -> FedClientModule:
        return PerFedAvgClientModule(net, beta=self.beta, num_classes=info.num_classes, lr=info.lr)

    def personalize(self, net: nn.Module, extra: dict[str, Any], info: ClientInfo, data: ClientData) -> None:
        batch = next(iter(data.train_loader()), None)
        if batch is None:
            return
        batch = data.preprocess({k: v.to(data.device) for k, v in batch.items()})
        params = [p for p in net.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = F.cross_entropy(net(batch["image"]), batch["target"])
            grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(info.lr * g)
