"""federated section: the time split of one FedFree round (Du et al., NeurIPS 2025, OpenReview G10Y4vrhGF) in the
in-process runtime, for the 20-client CIFAR-100 setting (configs/fedfree/cifar100_htfe8_20clients.yaml) on
synthetic CIFAR-100-sized data.

Cases (every time is per round; ratio = share of the whole round, the first row):
- one round: local training of every client, the server step, delivery of the aligned layers and evaluation;
- client training: the 20 client-rounds (fresh Trainer each, fit, upload selection, weight copies);
- training steps only: forward / backward / optimizer step of every batch (GPU synchronised around each step);
- client-round overhead: client training minus its steps (Trainer construction, loader start, weight transfer to
  and from the device, Eq. 2 layer deltas) - target < 10% of client training;
- server: pseudo-data distillation + KGE alignment - target < 5% of the round;
- evaluation: delivery of the aligned layers and every client's local test set;
- round checkpoint: writing every client's weights (what makes a killed run resumable).

Sizes: small mode (smoke test) 20 clients with the small families ``fed_cnn`` / ``fedavg_cnn`` / ``fed_resnet8``,
one batch of 10 per client, 20 test images per client; CPU mode the paper's eight HtFE-img-8 families, two batches of
10 per client, 20 test images per client; full mode (GPU) HtFE-img-8 and one local epoch on 2,250 training images per
client (50,000 / 20 x 0.9), batch 10 as in the paper.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from lightning_methods.datamodules import FederatedDataModule
from lightning_methods.federated import FederationInfo, FedFree
from lightning_methods.federated.config import FederationConfig, assign_families
from lightning_methods.federated.local import ClientRuntime
from lightning_methods.federated.runner import FederatedRunner
from lightning_methods.models.fed_clients import HTFE_IMG8
from lightning_methods.utils import atomic_torch_save

from harness import Settings


class SyntheticFederated(FederatedDataModule):
    """Random uint8 32x32 images with 100 classes, partitioned like the CIFAR-100 configs."""

    def __init__(self, n_train: int, n_test: int, **kwargs) -> None:
        super().__init__("cifar100", **kwargs)
        self.n_train, self.n_test = n_train, n_test

    def prepare_data(self) -> None:
        pass

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        n = self.n_train + self.n_test
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.arange(n) % 100
        return {"train": (x[: self.n_train], y[: self.n_train]), "test": (x[self.n_train :], y[self.n_train :])}


def _sizes(s: Settings) -> dict:
    if s.n_train <= 256:
        return {"families": ["fed_cnn", "fedavg_cnn", "fed_resnet8"], "batches": 1, "train": 2000, "test": 400}
    if s.device == "cpu":
        return {"families": list(HTFE_IMG8), "batches": 2, "train": 4000, "test": 400}
    return {"families": list(HTFE_IMG8), "batches": 1.0, "train": 50_000, "test": 10_000}


class RoundTimer:
    """Builds the 20-client federation once; each :meth:`measure` runs one more round and keeps its split."""

    def __init__(self, s: Settings) -> None:
        z = _sizes(s)
        self.data = SyntheticFederated(z["train"], z["test"], num_clients=20, classes_per_client=10, batch_size=10)
        self.fed = FederationConfig(rounds=1000, local_epochs=1, families=z["families"])
        accel = "gpu" if s.device.startswith("cuda") else "cpu"
        trainer = {"accelerator": accel, "devices": 1, "precision": s.precision, "limit_train_batches": z["batches"]}
        self.runner = FederatedRunner(self.data, FedFree(k=2), self.fed, tempfile.mkdtemp(), trainer,
                                      progress=False, profile_steps=True)
        self.data.setup()
        families = assign_families(self.fed.families, 20, self.fed.assignment, self.fed.seed)
        self.runner.families = families
        algo = self.runner.algorithm
        algo.setup_server(FederationInfo(20, 100, families, 0, 512, "cifar", self.fed.rounds))
        self.runner.runtime = ClientRuntime(self.data, algo, self.fed, families, trainer, profile_steps=True)
        self.runner.clients = [self.runner.runtime.init_client(i) for i in range(20)]
        self.round, self.split, self.images = 0, {}, sum(self.data.train_sizes())

    def measure(self) -> float:
        self.round += 1
        t0 = time.perf_counter()
        record = self.runner.run_round(self.round)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        atomic_torch_save({"clients": self.runner.clients}, Path(self.runner.run_dir) / "bench_round.pt")
        self.split = {"train": record["time/train"], "steps": record["time/steps"],
                      "overhead": record["time/train"] - record["time/steps"], "server": record["time/server"],
                      "eval": record["time/eval"], "checkpoint": time.perf_counter() - t1}
        return total


def cases(s: Settings) -> list[tuple]:
    timer = RoundTimer(s)
    part = lambda key: (lambda: timer.split[key])  # noqa: E731 - the split of the round the baseline just timed
    z = _sizes(s)
    per_round = 20 * 10 * (z["batches"] if isinstance(z["batches"], int) else 225)
    return [
        ("FedFree round, 20 clients (per round)", timer.measure, per_round),
        ("client training, incl. overhead (per round)", part("train"), per_round),
        ("training steps only (per round)", part("steps"), per_round),
        ("client-round overhead (per round)", part("overhead"), per_round),
        ("server: distillation + KGE alignment (per round)", part("server"), per_round),
        ("evaluation incl. layer delivery (per round)", part("eval"), per_round),
        ("round checkpoint write (per round)", part("checkpoint"), per_round),
    ]
