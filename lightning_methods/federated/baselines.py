"""Homogeneous-FL baselines of FedFree's Table 1: FedAvg, FedProx and Per-FedAvg (every client has the same
architecture; pFedLA, the fourth, is in :mod:`.pfedla`).

- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data" (arXiv
  1602.05629). The server averages the client models weighted by their training-set sizes (PFLlib's
  ``aggregate_parameters``: parameters; here floating-point buffers such as BatchNorm statistics too, integer
  buffers are taken from the first client) and every client continues from the average.
- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks" (arXiv 1812.06127): FedAvg whose local
  objective adds ``mu / 2 * ||w - w_global||^2`` (PFLlib's ``PerturbedGradientDescent``; FedFree: mu = 0.01).
- Per-FedAvg: Fallah, Mokhtari, Ozdaglar, "Personalized Federated Learning with Theoretical Guarantees: A
  Model-Agnostic Meta-Learning Approach" (NeurIPS 2020, arXiv 2002.07948). First-order version (default, ``"fo"``:
  Per-FedAvg (FO), as PFLlib implements it and FedFree compares with): each local step takes two batches ``D``,
  ``D'`` and sets ``w <- w - beta grad f(w - alpha grad f(w; D); D')``; Hessian-free version (``"hf"``, the paper's
  Per-FedAvg (HF)): a third batch ``D''`` and ``w <- w - beta (I - alpha H(w; D'')) grad f(w - alpha grad f(w; D);
  D')``, the Hessian-vector product by double backward. ``alpha``: the clients' lr (FedFree 0.01); ``beta``: PFLlib
  sets it to the same lr (FedFree lists 0.01). The server averages as FedAvg. A client's model is the global model
  after one step ``w - alpha grad f(w; D)`` on one of its training batches: each evaluation adapts the global model
  so, then tests it (PFLlib's ``evaluate_one_step``).

  Details. The batches of a step are consecutive batches of the client's loader (PFLlib splits one batch of twice
  the size: the same samples per step and the same number of steps, ``floor(n / 2B)``). The adaptation batch of an
  evaluation is drawn by (seed, round, client), without augmentation. PFLlib's server calls each client's
  ``train()`` twice per round, i.e. runs twice the configured local epochs: to reproduce its schedule set
  ``federation.local_epochs`` to twice its value.
"""

from __future__ import annotations

import warnings
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
    """Per-FedAvg's local step over consecutive batches: the first (``D``) takes the inner step with the optimizer's
    lr ``alpha``; the gradient on the second (``D'``) at the adapted weights - for ``hf``, minus ``alpha`` times its
    product with the Hessian on a third batch (``D''``) at the weights from before the inner step - is applied to those
    weights with lr ``beta``. Batches left over at the end of an epoch (fewer than a step takes) are not used."""

    def __init__(self, backbone: nn.Module, beta: float = 0.01, hf: bool = False, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.beta, self.hf = beta, hf
        self.pending: list[dict[str, torch.Tensor]] = []
        self.meta_steps = 0

    def on_train_epoch_start(self) -> None:
        self.pending = []

    def on_train_end(self) -> None:
        if self.meta_steps == 0:
            need = 3 if self.hf else 2
            warnings.warn(f"Per-FedAvg: this client-round took no step: one step needs {need} batches and the client "
                          f"had fewer per epoch; lower data.batch_size (or use variant fo) so that every client "
                          "trains", UserWarning, stacklevel=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        self.pending.append(as_dict_batch(batch))
        if len(self.pending) < (3 if self.hf else 2):
            return None
        (support, query, *hessian), self.pending = self.pending, []
        self.meta_steps += 1
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        groups = self._optimizers()[0].param_groups
        alpha = groups[0]["lr"]
        self.step_with_closure(support)  # w_tmp = w - alpha grad f(w; D)
        opt = self.optimizers()
        closure = self.make_closure(query, opt)
        gradient_at_adapted = closure.run

        def outer_direction(c: Any, call: int) -> torch.Tensor:  # grad f(w_tmp; D'), the weights back to w, HF term
            losses = gradient_at_adapted(c, call)
            with torch.no_grad():
                for p, w in zip(params, start):
                    p.copy_(w)
            if hessian:
                for p, hv in zip(params, self.hessian_vector_product(hessian[0], params,
                                                                     [p.grad.detach().clone() for p in params])):
                    p.grad.sub_(alpha * hv)
            return losses

        closure.run = outer_direction
        for group in groups:
            group["lr"] = self.beta
        try:  # w <- w - beta (I - alpha H(w; D'')) grad f(w_tmp; D')
            opt.step(closure=closure)
        finally:
            for group in groups:
                group["lr"] = alpha
            self.closure_call = 0
        self.log_training_step(query, closure)
        return closure.first_loss

    def hessian_vector_product(self, batch: dict[str, torch.Tensor], params: list[torch.Tensor],
                               vector: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``H v`` of the mean training loss on ``batch`` at the current weights (double backward)."""
        with torch.enable_grad():
            losses, _ = self.forward_loss(batch)
            grads = torch.autograd.grad(losses.mean(), params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vector))
            return torch.autograd.grad(dot, params)


class PerFedAvg(FedAvg):
    """Per-FedAvg (see the module docstring).

    Args:
        beta: the outer (meta) step size; ``None`` (default): the clients' learning rate ``federation.lr``, as PFLlib
            sets it (FedFree: 0.01 = its lr). The inner step size ``alpha`` is always the clients' learning rate.
        variant: ``"fo"`` (default; PFLlib's and FedFree's): first-order, two batches per step; ``"hf"``:
            Hessian-free, three batches per step, the Hessian-vector product on the third.
    """

    name = "perfedavg"
    VARIANTS = ("fo", "hf")

    def __init__(self, beta: float | None = None, variant: str = "fo") -> None:
        if beta is not None and not beta > 0:
            raise ValueError(f"Per-FedAvg beta={beta!r}: the outer step size must be > 0 (or null: the clients' lr)")
        if variant not in self.VARIANTS:
            raise ValueError(f"Per-FedAvg variant={variant!r}: choose one of {self.VARIANTS}")
        self.beta, self.variant = beta, variant

    def validate_client(self, net: nn.Module, info: ClientInfo) -> None:
        if info.momentum or info.weight_decay:
            raise ValueError(f"Per-FedAvg takes plain SGD steps (PFLlib's PerAvgOptimizer); federation.momentum="
                             f"{info.momentum:g} and federation.weight_decay={info.weight_decay:g} must be 0")

    def make_module(self, net: nn.Module, extra: dict[str, Any], info: ClientInfo) -> FedClientModule:
        beta = info.lr if self.beta is None else self.beta
        return PerFedAvgClientModule(net, beta=beta, hf=self.variant == "hf", num_classes=info.num_classes, lr=info.lr)

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
