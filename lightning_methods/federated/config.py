"""Federation settings of ``lightning-methods-fed`` and the client-family assignment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lightning_methods.models.fed_clients import HTFE_IMG8, client_families
from lightning_methods.utils import mix_seed

ASSIGN_KEY = 31_337


@dataclass
class FederationConfig:
    """How the federation runs (FedFree Table A2 / Sec. 4.1 defaults).

    Args:
        rounds: communication rounds T (paper: 200).
        local_epochs: local epochs E per round (Sec. 4.1: 5; Table A2: 30 - a 6x compute difference; always logged).
        families: client model families, assigned to clients (see ``assignment``); default HtFLlib's
            ``HtFE-img-8`` (the paper's eight families). ``[fed_cnn]`` is the homogeneous (HmFL) setting.
        assignment: ``"random"`` (paper: families assigned at random; here a seeded shuffle of the balanced
            ``client % len(families)`` assignment, so every family is used) or ``"modulo"`` (HtFLlib:
            ``families[client % len(families)]``).
        stem: ``"cifar"`` (stride-1 3x3 stems) or ``"imagenet"`` (HtFLlib's exact torchvision models).
        feature_dim: width of the shared feature space (512).
        lr: local SGD learning rate (0.01).
        momentum: local SGD momentum (0).
        weight_decay: local SGD weight decay (0).
        keep_optimizer_state: carry each client's optimizer state across rounds (only matters with momentum).
        eval_every: evaluate every n rounds (the last round is always evaluated).
        keep_checkpoints: round checkpoints kept on disk (the newest ones; at least 1 for resuming).
        seed: seed of model initialisation, family assignment, data order, augmentation and server pseudo-data.
    """

    rounds: int = 200
    local_epochs: int = 5
    families: list[str] = field(default_factory=lambda: list(HTFE_IMG8))
    assignment: Literal["random", "modulo"] = "random"
    stem: Literal["cifar", "imagenet"] = "cifar"
    feature_dim: int = 512
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    keep_optimizer_state: bool = False
    eval_every: int = 1
    keep_checkpoints: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_epochs < 1 or self.eval_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("rounds, local_epochs, eval_every and keep_checkpoints must be >= 1")
        if not self.families:
            raise ValueError("federation.families is empty: list at least one client family (e.g. [fed_cnn])")
        if self.assignment not in ("random", "modulo"):
            raise ValueError(f"federation.assignment must be 'random' or 'modulo', got {self.assignment!r}")
        unknown = [name for name in self.families if name not in client_families()]
        if unknown:
            raise ValueError(f"federation.families: unknown client family {unknown[0]!r}; known: "
                             f"{', '.join(client_families())}")


def assign_families(families: list[str], num_clients: int, assignment: str, seed: int) -> list[str]:
    """The family of every client: ``families[i % len]`` (``"modulo"``) or a seeded shuffle of it (``"random"``)."""
    base = [families[i % len(families)] for i in range(num_clients)]
    if assignment == "modulo":
        return base
    order = np.random.RandomState(mix_seed(seed, ASSIGN_KEY) % 2**32).permutation(num_clients)
    return [base[i] for i in order]
