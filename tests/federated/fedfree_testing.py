"""Shared pieces of the FedFree tests: tiny federations, and an in-process Flower ``Grid`` that delivers the
``ServerApp``'s messages to ``ClientApp`` callables in the same process (Flower's own Message objects, no Ray)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

TINY_TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "limit_train_batches": 2}


def tiny_config(tmp_path: Path, algorithm: dict[str, Any] | None = None, **overrides: Any) -> Path:
    """A small ``lightning-methods-fed`` config on the bundled digits: 3 clients, 2 small families."""
    cfg: dict[str, Any] = {
        "run_dir": str(tmp_path / "run"),
        "progress": False,
        "data": {"dataset": "digits", "batch_size": 16, "eval_batch_size": 128,
                 "partition": {"num_clients": 3, "scheme": "pathological", "classes_per_client": 2}},
        "federation": {"rounds": 1, "local_epochs": 1, "families": ["fedavg_cnn", "fed_resnet8"]},
        "algorithm": algorithm or {"class_path": "lightning_methods.federated.FedFree",
                                   "init_args": {"k": 2, "pseudo_batch_size": 16}},
        "trainer": dict(TINY_TRAINER),
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            cfg[section][leaf] = value
        else:
            cfg[section] = value
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class InProcessGrid:
    """A Flower ``Grid`` for tests: ``send_and_receive`` calls the ClientApp of each destination node directly.

    Node ``i`` gets ``node_config = {"partition-id": i, "num-partitions": n}`` and a persistent ``Context`` with
    ``run_config`` (Flower's run config, as ``flwr run`` fuses it from the app's ``pyproject.toml``).
    """

    def __new__(cls, client_app: Any, num_nodes: int, run_config: dict[str, Any] | None = None) -> Any:
        from flwr.app import Context, RecordDict
        from flwr.serverapp import Grid
        from flwr.supercore.task_identity import TaskIdentity

        class _Grid(Grid):
            def __init__(self) -> None:
                TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
                self.node_ids = [1000 + i for i in range(num_nodes)]
                self.contexts = {n: Context(1, n, {"partition-id": i, "num-partitions": num_nodes}, RecordDict(),
                                            dict(run_config or {}))
                                 for i, n in enumerate(self.node_ids)}
                self.sent: list[Any] = []

            def set_run(self, run: Any) -> None:
                pass

            @property
            def run(self) -> Any:
                return None

            def create_message(self, *args: Any, **kwargs: Any) -> Any:
                raise NotImplementedError

            def get_node_ids(self) -> Iterable[int]:
                return list(self.node_ids)

            def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
                raise NotImplementedError

            def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
                raise NotImplementedError

            def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
                replies = []
                for msg in messages:
                    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # the SuperLink's job
                    self.sent.append(msg)
                    replies.append(client_app(msg, self.contexts[msg.metadata.dst_node_id]))
                return replies

        return _Grid()


def make_runner(tmp_path: Path, algorithm: Any, families: list[str] | None = None, rounds: int = 1,
                num_clients: int = 3, logger: dict | None = None, **federation: Any) -> Any:
    """A FederatedRunner of ``algorithm`` (an object) on the bundled digits with tiny clients (2 training batches per
    client-round), built from a parsed config as the command builds it; it runs in ``tmp_path/run/<name>``."""
    from lightning_methods.federated.cli import build_parser
    from lightning_methods.federated.runner import FederatedRunner

    parser = build_parser()
    config = parser.parse_object({
        "run_dir": str(tmp_path / "run"), "progress": False, "logger": logger, "trainer": dict(TINY_TRAINER),
        "data": {"dataset": "digits", "batch_size": 16, "eval_batch_size": 128, "seed": 0,
                 "partition": {"num_clients": num_clients, "scheme": "pathological", "classes_per_client": 2}},
        "federation": {"rounds": rounds, "local_epochs": 1, "families": families or ["fedavg_cnn", "fed_resnet8"],
                       **federation},
        "algorithm": {"class_path": "lightning_methods.federated.LocalOnly"}})
    return FederatedRunner(parser, config, algorithm=algorithm)


class Killed(Exception):
    """Stands for a kill (SIGKILL, power loss) in the middle of a round."""


def kill_and_resume(tmp_path: Path, make_algorithm: Any, monkeypatch: Any, rounds: int = 3, kill_round: int = 3,
                    num_clients: int = 2, **federation: Any) -> tuple[Any, Any, list[tuple[int, int]]]:
    """An uninterrupted run of ``rounds`` and one killed at the last client of ``kill_round`` and then resumed (fresh
    algorithm objects from ``make_algorithm()`` each time); returns ``(full, resumed, client-rounds the resumed run
    trained)``."""
    from lightning_methods.federated.local import ClientRuntime

    full = make_runner(tmp_path / "a", make_algorithm(), rounds=rounds, num_clients=num_clients, **federation)
    full.run()
    calls, alive = [], [False]
    fit = ClientRuntime.fit

    def dying_fit(self: Any, i: int, client: Any, round: int) -> Any:
        calls.append((round, i))
        if round == kill_round and i == num_clients - 1 and not alive[0]:
            raise Killed(f"killed in round {round}, client {i}")
        return fit(self, i, client, round)

    monkeypatch.setattr(ClientRuntime, "fit", dying_fit)
    try:
        make_runner(tmp_path / "b", make_algorithm(), rounds=rounds, num_clients=num_clients, **federation).run()
    except Killed:
        pass
    else:
        raise AssertionError("the run was not killed")
    calls.clear()
    alive[0] = True
    resumed = make_runner(tmp_path / "b", make_algorithm(), rounds=rounds, num_clients=num_clients, **federation)
    resumed.run()
    return full, resumed, calls


def assert_same_state(a: Any, b: Any) -> None:
    """Two nested structures of tensors / numbers / strings are bit for bit equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif hasattr(a, "dtype") and hasattr(a, "shape"):
        import torch

        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def wandb_history_keys(root: Path) -> set[str]:
    """Keys logged to the history of the offline W&B runs under ``root``."""
    from helpers import read_wandb_records

    return {i.key or "/".join(i.nested_key) for f in root.rglob("run-*.wandb") for r in read_wandb_records(f)
            if r.WhichOneof("record_type") == "history" for i in r.history.item}
