"""The algorithm interface shared by both runtimes (the in-process runner and the Flower apps).

A federated algorithm is written once as a :class:`FedAlgorithm`: server-side methods (``setup_server``,
``aggregate``, ``download``, state for checkpoints) and client-side methods (``init_client``, ``apply_download``,
``make_module``, ``after_fit``, ``upload``, ``predictor``). Server and clients exchange :class:`Payload` objects:
named tensors plus JSON-serialisable metadata, which map one-to-one onto Flower's ``ArrayRecord`` and a JSON string
in a ``ConfigRecord``, so heterogeneous layers (names, shapes, kinds) travel unchanged in Flower messages.

One round, in both runtimes:

1. every client applies its pending download (round 1: :meth:`FedAlgorithm.initial_download`), trains locally (a quiet
   Trainer with a fresh fit loop) on :meth:`FedAlgorithm.make_module`, and returns :meth:`FedAlgorithm.upload`;
2. the server runs :meth:`FedAlgorithm.aggregate` on all uploads;
3. every client receives :meth:`FedAlgorithm.download` (applied at once), then is evaluated on its local test set
   (HtFLlib evaluates at this point too: after the server's update, before the next local training).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_methods.callbacks.nonfinite_guard import NonFiniteTrainingError
from lightning_methods.federated.client import FedClientModule
from lightning_methods.utils import mix_seed

#: Key mixed into the seed of the server's global model initialisation.
GLOBAL_INIT_KEY = 7_777


@dataclass
class Payload:
    """A message between server and client: named tensors and JSON-serialisable metadata."""

    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"arrays": dict(self.arrays), "meta": json.dumps(self.meta)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Payload:
        return cls(dict(data["arrays"]), json.loads(data["meta"]))


@dataclass
class FederationInfo:
    """What the server knows about the federation (no client data, no client weights)."""

    num_clients: int
    num_classes: int
    families: list[str]
    seed: int = 0
    feature_dim: int = 512
    stem: str = "cifar"
    rounds: int = 1
    #: input height = width of the images (32 for CIFAR, 64 for Tiny-ImageNet): the CNN families' flattened width
    #: and the traced layer input sizes of FedFree's layer inventory depend on it
    image_size: int = 32


@dataclass
class ClientInfo:
    """What a client knows about itself in one round."""

    client_id: int
    family: str
    num_classes: int
    num_examples: int
    round: int = 1
    seed: int = 0
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    feature_dim: int = 512
    stem: str = "cifar"
    image_size: int = 32


@dataclass
class ClientData:
    """Access to one client's local training data outside the Trainer (FedGH's prototypes after training)."""

    train_loader: Callable[[], Iterable[dict[str, torch.Tensor]]]
    preprocess: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    device: torch.device | str = "cpu"


def build_net(family: str, info: FederationInfo | ClientInfo, seed: int, feature_dim: int = 512,
              stem: str = "cifar") -> nn.Module:
    """A client-family network whose initialisation is a function of ``seed`` only (never of the global RNG)."""
    from lightning_methods.models.fed_clients import create_client_net

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_client_net(family, info.num_classes, feature_dim=feature_dim, stem=stem,
                                 input_size=info.image_size)


def cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict."""
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def non_finite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Paths of the NaN / inf floating-point tensors and floats in a nested structure (dicts, lists, payloads)."""
    if isinstance(obj, Payload):
        return non_finite_entries(obj.arrays, prefix)
    if isinstance(obj, torch.Tensor):
        return [prefix] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix]
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in non_finite_entries(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in non_finite_entries(v, f"{prefix}[{i}]")]
    return []


def check_finite(obj: Any, what: str) -> None:
    """Raise :class:`~lightning_methods.callbacks.nonfinite_guard.NonFiniteTrainingError` naming the non-finite
    entries of ``obj`` (``what`` says what it is: "round 3: server state after aggregation", ...)."""
    bad = non_finite_entries(obj)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise NonFiniteTrainingError(f"{what}: NaN or inf in {shown}; the round is not recorded. Most often a client "
                                     "or server learning rate that is too high (federation.lr, the algorithm's "
                                     "server_lr): lower it and rerun in a new run_dir.")


def minibatch_sgd(parameters: Iterable[nn.Parameter], n: int, batch_loss: Callable[[torch.Tensor], torch.Tensor],
                  lr: float, epochs: int, batch_size: int, generator: torch.Generator) -> list[float]:
    """A server-side training loop (FedGH's head, FedTGP's prototypes): ``epochs`` passes of plain SGD over ``n``
    samples in minibatches of ``batch_size`` (the last one smaller), reshuffled each epoch by ``generator``;
    ``batch_loss(indices)`` is a batch's mean loss. Returns the sample-weighted mean loss of each epoch."""
    opt = torch.optim.SGD(list(parameters), lr=lr)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = batch_loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / max(n, 1))
    return losses


class FedAlgorithm:
    """Base class: no collaboration (Local-only). Subclasses override the hooks they need.

    Class attributes:
        name: short name used in tables and run names.
        same_architecture: the algorithm averages whole models, so every client must use the same family.
    """

    name = "local"
    same_architecture = False

    # ------------------------------------------------------------------------------------------ server side
    def setup_server(self, info: FederationInfo) -> None:
        """Create the server state (global model, prototypes, ...) from the federation description."""
        self.info = info
        self.pending: dict[int, Payload] = {}

    def server_state_dict(self) -> dict[str, Any]:
        """Everything the server needs to resume (tensors, lists, numbers)."""
        return {}

    def load_server_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`server_state_dict`."""

    def initial_download(self, client: int) -> Payload | None:
        """What a client receives before its first local update (e.g. FedAvg's initial global model)."""
        return None

    def aggregate(self, round: int, uploads: Mapping[int, Payload]) -> dict[str, Any]:
        """Server update from the clients' uploads; returns metrics (numbers, or strings / lists for tables)."""
        return {}

    def download(self, client: int) -> Payload | None:
        """What ``client`` receives after this round's :meth:`aggregate` (``None``: nothing)."""
        return self.pending.pop(client, None)

    # ------------------------------------------------------------------------------------------ client side
    def init_client(self, net: nn.Module, info: ClientInfo) -> dict[str, Any]:
        """Extra client state kept between rounds besides the network weights (tensors, lists, numbers)."""
        return {}

    def validate_client(self, net: nn.Module, info: ClientInfo) -> None:
        """Raise a clear error before any training when the algorithm cannot serve this client family."""

    def apply_download(self, net: nn.Module, extra: dict[str, Any], payload: Payload, info: ClientInfo) -> None:
        """Apply a server message to the client (in place)."""

    def make_module(self, net: nn.Module, extra: dict[str, Any], info: ClientInfo) -> FedClientModule:
        """The LightningModule that trains ``net`` for one round."""
        return FedClientModule(net, info.num_classes, lr=info.lr, momentum=info.momentum,
                               weight_decay=info.weight_decay)

    def after_fit(self, module: FedClientModule, extra: dict[str, Any], info: ClientInfo, data: ClientData) -> None:
        """Update ``extra`` from the trained module (prototypes, mentee weights, ...)."""

    def upload(self, before: Mapping[str, torch.Tensor], net: nn.Module, extra: dict[str, Any],
               info: ClientInfo) -> Payload:
        """What the client sends to the server after local training (``before``: weights at the round's start)."""
        return Payload(meta={"num_examples": info.num_examples})

    def personalize(self, net: nn.Module, extra: dict[str, Any], info: ClientInfo, data: ClientData) -> None:
        """Adapt the network in place before an evaluation (Per-FedAvg's one-step adaptation on a training batch;
        default: nothing). ``net`` is a working copy: what this changes is evaluated, then dropped."""

    def predictor(self, net: nn.Module, extra: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Class scores for evaluation (default: the network's logits)."""
        return net

    # ------------------------------------------------------------------------------------------ helpers
    def global_seed(self, *keys: int) -> int:
        return mix_seed(self.info.seed, GLOBAL_INIT_KEY, *keys)


class LocalOnly(FedAlgorithm):
    """Local-only baseline: every client trains on its own data, nothing is exchanged (HtFLlib ``Local``)."""

    name = "local"
