"""federated section: the time split of one FedFree round (Du et al., NeurIPS 2025, OpenReview G10Y4vrhGF) in the
in-process runtime, for the 20-client CIFAR-100 setting (configs/federated/cifar100_htfe8_20clients.yaml) on
synthetic CIFAR-100-sized data, and the per-client fixed cost of a client-round with one reused Trainer (the
runtime's default) against a fresh Trainer per client-round (the previous implementation; issue 25).

Harness cases (interleaved rounds; ratio = per-round time / the first case's time of the same round):
- one round: local training of every client, the server step, delivery of the aligned layers and evaluation, with
  one reused Trainer for all client-rounds (the runtime's default);
- the same round with a fresh Trainer per client-round (the implementation before issue 25);
- the server step alone of the other algorithms of FedFree's Table 1, at 20 clients with the paper's settings, on
  synthetic uploads: FedAvg (also FedProx's and Per-FedAvg's server) and pFedLA on the HmFL 5-layer CNN (1.19M
  parameters per client at CIFAR-100), FedProto, FedGH and FedTGP (100 server epochs) on 512-d prototypes of 10
  classes per client out of 100.

The client-round overhead (client training minus its training steps: Trainer setup, loader start, weight copies to
and from the device, Eq. 2 layer deltas; target < 10% of client training) is measured by this file's own command:
the client-training phases of both variants alternate round by round, the order rotating, on the same clients, and
each round gives the share overhead / client training of each variant (median, 25th-75th percentiles)::

    python benchmarks/federated_cases.py --mode cpu --rounds 3 [--out overhead.json]

Sizes: small mode (smoke test) 20 clients with the small families ``fed_cnn`` / ``fedavg_cnn`` / ``fed_resnet8``,
one batch of 10 per client, 20 test images per client; CPU mode the paper's eight HtFE-img-8 families, two batches of
10 per client, 20 test images per client; full mode (GPU) HtFE-img-8 and one local epoch on 2,250 training images per
client (50,000 / 20 x 0.9), batch 10 as in the paper.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_methods.datamodules import FederatedDataModule
from lightning_methods.federated.cli import build_parser
from lightning_methods.federated.local import ClientRuntime
from lightning_methods.federated.partition import PartitionSettings
from lightning_methods.federated.runner import FederatedRunner
from lightning_methods.models.fed_clients import HTFE_IMG8
from lightning_methods.utils import atomic_torch_save

from harness import Settings, machine, settings


class SyntheticFederated(FederatedDataModule):
    """Random uint8 32x32 images with 100 classes, partitioned like the CIFAR-100 configs."""

    def __init__(self, n_train: int, n_test: int, **kwargs: Any) -> None:
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
    """Builds the 20-client federation once (a runner from a parsed config, on synthetic data) with two client
    runtimes over the same clients: one reused Trainer (the default) and a fresh Trainer per client-round."""

    def __init__(self, s: Settings, num_clients: int = 20) -> None:
        z = _sizes(s)
        accel = "gpu" if s.device.startswith("cuda") else "cpu"
        trainer = {"accelerator": accel, "devices": 1, "precision": s.precision, "limit_train_batches": z["batches"]}
        parser = build_parser()
        config = parser.parse_object({
            "run_dir": tempfile.mkdtemp(), "progress": False, "profile_steps": True, "trainer": trainer,
            "data": {"dataset": "cifar100", "batch_size": 10,
                     "partition": {"num_clients": num_clients, "classes_per_client": 10}},
            "federation": {"rounds": 1000, "local_epochs": 1, "families": z["families"]},
            "algorithm": {"class_path": "lightning_methods.federated.FedFree", "init_args": {"k": 2}}})
        self.runner = runner = FederatedRunner(parser, config)
        runner.data = SyntheticFederated(z["train"], z["test"], batch_size=10,
                                         partition=PartitionSettings(num_clients=num_clients,
                                                                     classes_per_client=10))
        runner.data.setup()
        runner.families, info = runner.federation_info()
        runner.algorithm.setup_server(info)
        self.runtimes = {reuse: ClientRuntime(runner.data, runner.algorithm, runner.fed, runner.families,
                                              trainer=trainer, profile_steps=True, reuse_trainer=reuse)
                         for reuse in (True, False)}
        runner.runtime = self.runtimes[True]
        runner.clients = [runner.runtime.init_client(i) for i in range(num_clients)]
        self.round, self.split, self.images = 0, {}, sum(runner.data.train_sizes())
        self.splits: dict[bool, dict[str, float]] = {}

    def measure(self, reuse: bool = True) -> float:
        """One full round with the reused (or fresh) Trainers; keeps its split in ``self.splits[reuse]``."""
        self.round += 1
        self.runner.runtime = self.runtimes[reuse]
        t0 = time.perf_counter()
        record = self.runner.run_round(self.round)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        atomic_torch_save({"clients": self.runner.clients}, Path(self.runner.run_dir) / "bench_round.pt")
        self.splits[reuse] = {"train": record["time/train"], "steps": record["time/steps"],
                              "overhead": record["time/train"] - record["time/steps"],
                              "server": record["time/server"], "eval": record["time/eval"],
                              "checkpoint": time.perf_counter() - t1}
        return total

    def client_phase(self, reuse: bool) -> dict[str, float]:
        """Only the client training of one round (every client's fit), with the reused or fresh Trainers."""
        self.round += 1
        rt = self.runtimes[reuse]
        train = steps = 0.0
        for i, client in enumerate(self.runner.clients):
            _, t = rt.fit(i, client, self.round)
            train, steps = train + t["train"], steps + t["steps"]
        return {"train": train, "steps": steps, "overhead": train - steps, "share": (train - steps) / train}


class ServerTimer:
    """One server step (``aggregate``) of an algorithm on fixed synthetic uploads of 20 clients, from the same server
    state each time."""

    def __init__(self, algorithm: Any, families: list[str], uploads: dict[int, Any]) -> None:
        from lightning_methods.federated.algorithm import FederationInfo

        self.algorithm, self.uploads, self.round = algorithm, uploads, 0
        algorithm.setup_server(FederationInfo(num_clients=len(uploads), num_classes=100, families=families))
        self.state = algorithm.server_state_dict()

    def measure(self) -> float:
        self.round += 1
        self.algorithm.load_server_state_dict(self.state)
        t0 = time.perf_counter()
        self.algorithm.aggregate(self.round, self.uploads)
        return time.perf_counter() - t0


def server_cases(num_clients: int = 20) -> list[tuple]:
    """The server steps of FedFree's baselines (see the module docstring), each ``(name, fn, 0)`` (no images)."""
    import lightning_methods.federated as fed
    from lightning_methods.federated.algorithm import FederationInfo, Payload, build_net, cpu_state

    g = torch.Generator().manual_seed(0)
    info = FederationInfo(num_clients=num_clients, num_classes=100, families=["fed_cnn"])
    model = cpu_state(build_net("fed_cnn", info, 0))
    weights = {c: Payload({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                           for k, v in model.items()}, {"num_examples": 2250}) for c in range(num_clients)}
    protos = {}
    for c in range(num_clients):
        mask = torch.zeros(100, dtype=torch.bool)
        mask[torch.randperm(100, generator=g)[:10]] = True
        protos[c] = Payload({"protos": torch.randn(100, 512, generator=g) * mask.unsqueeze(1), "mask": mask},
                            {"num_examples": 2250})
    hmfl, htfl = ["fed_cnn"] * num_clients, list(HTFE_IMG8) * (num_clients // len(HTFE_IMG8) + 1)
    timers = [("FedAvg / FedProx / Per-FedAvg", fed.FedAvg(), hmfl, weights),
              ("pFedLA", fed.PFedLA(), hmfl, weights),
              ("FedProto", fed.FedProto(), htfl[:num_clients], protos),
              ("FedGH", fed.FedGH(), htfl[:num_clients], protos),
              ("FedTGP (100 server epochs)", fed.FedTGP(), htfl[:num_clients], protos)]
    return [(f"{name} server step, {num_clients} clients (per round)", ServerTimer(alg, fams, ups).measure, 0)
            for name, alg, fams, ups in timers]


def cases(s: Settings) -> list[tuple]:
    """The harness's interleaved cases: a full round with the reused Trainer (the baseline) and with a fresh Trainer
    per client-round. The split of a round (client training, steps, overhead, server, evaluation, checkpoint) is in
    each round's record (``history.csv`` of a run); the overhead share with its spread comes from :func:`main`."""
    timer = RoundTimer(s)
    z = _sizes(s)
    per_round = 20 * 10 * (z["batches"] if isinstance(z["batches"], int) else 225)
    return [
        ("FedFree round, 20 clients, one reused Trainer (per round)", timer.measure, per_round),
        ("FedFree round, fresh Trainer per client-round (previous; per round)", lambda: timer.measure(False),
         per_round),
        *server_cases(),
    ]


def quartiles(values: list[float]) -> dict[str, float]:
    """Median and 25th / 75th percentiles (``statistics.quantiles``, inclusive method)."""
    if len(values) == 1:
        return {"median": values[0], "p25": values[0], "p75": values[0]}
    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2]}


def overhead_interleaved(mode: str, rounds: int, num_clients: int = 20) -> dict[str, Any]:
    """Client-round overhead share (overhead / client training) per round for both variants, interleaved: each round
    runs the client phase of both, the order rotating; plus the per-round ratio of their overhead seconds."""
    s = settings(mode)
    timer = RoundTimer(s, num_clients)
    timer.client_phase(True)  # warm-up (allocator, kernels, the first Trainer): not recorded
    timer.client_phase(False)
    per: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for r in range(rounds):
        for reuse in ((True, False) if r % 2 == 0 else (False, True)):
            per[reuse].append(timer.client_phase(reuse))
            print(f"round {r + 1} {'reused' if reuse else 'fresh '}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in per[reuse][-1].items()), flush=True)
    ratio = [a["overhead"] / b["overhead"] for a, b in zip(per[True], per[False])]
    families = [timer.runner.families.count(f) for f in sorted(set(timer.runner.families))]
    return {"mode": mode, "rounds": rounds, "clients": num_clients, "family_counts": dict(zip(
            sorted(set(timer.runner.families)), families)), "machine": machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "reused": {k: quartiles([p[k] for p in per[True]]) for k in ("share", "overhead", "train", "steps")},
            "fresh": {k: quartiles([p[k] for p in per[False]]) for k in ("share", "overhead", "train", "steps")},
            "overhead_ratio_reused_over_fresh": quartiles(ratio)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("small", "cpu", "full"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=20, help="clients (20: the 20-client setting; 8: one per "
                        "HtFE-img-8 family, for a quicker estimate)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = overhead_interleaved(args.mode, args.rounds, args.clients)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
