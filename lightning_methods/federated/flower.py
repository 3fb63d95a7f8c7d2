"""Flower runtime (optional extra ``[federated]``): the same algorithm objects as a Flower ``ServerApp`` strategy and
``ClientApp``, on Flower's current Message API (``flwr`` >= 1.20: ``flwr.serverapp.strategy.Strategy``,
``flwr.clientapp.ClientApp`` with ``@app.train()`` / ``@app.evaluate()``).

- :class:`AlgorithmStrategy` runs a :class:`~.algorithm.FedAlgorithm`'s server side: ``configure_train`` sends each
  node its round-1 initial download, ``aggregate_train`` runs ``aggregate`` (FedFree: pseudo-data distillation and
  KGE alignment), ``configure_evaluate`` sends each node its own download (FedFree: the selected global layer, or
  nothing), ``aggregate_evaluate`` computes the accuracy summary.
- :func:`make_client_app` runs the client side with :class:`~.local.ClientRuntime` (one quiet Trainer, a fresh
  fit loop per client-round), keeping the client's weights and state in ``context.state`` between rounds.
- Heterogeneous payloads travel natively: tensors of any names and shapes in an ``ArrayRecord``, metadata (layer
  names, kinds, shapes, KGE) as a JSON string in a ``ConfigRecord``; the client's ``partition-id`` (node config) is
  its client id, learned by the strategy with one ``query`` message per node.

Both apps are built from the same ``lightning-methods-fed`` config, so the partition (seeded), the client families
and every setting agree with the in-process runner. For ``flwr run``, point a Flower app's ``pyproject.toml`` at
``lightning_methods.federated.flower:server_app`` / ``:client_app`` and set ``config`` (the YAML path) and optionally
``overrides`` (extra command-line arguments) in ``[tool.flwr.app.config]``; see docs/methods/federated.md.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from lightning_methods.federated.algorithm import FederationInfo, Payload, check_finite
from lightning_methods.federated.results import round_metrics
from lightning_methods.utils import atomic_torch_save, atomic_write_json

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("lightning_methods.federated.flower needs Flower: pip install 'lightning-methods[federated]' "
                      f"(flwr[simulation] >= 1.42); import failed with: {err}") from err


# ---------------------------------------------------------------------------------------------- (de)serialisation
def flatten(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into its tensors (keyed by path) and a JSON skeleton that points at them."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().cpu()}, {"__tensor__": prefix}
    if isinstance(obj, Mapping):  # items keep their key types (optimizer states have int keys)
        tensors, items = {}, []
        for key, value in obj.items():
            t, s = flatten(value, f"{prefix}/{key}")
            tensors.update(t)
            items.append([key, s])
        return tensors, {"__items__": items}
    if isinstance(obj, (list, tuple)):
        tensors, items = {}, []
        for i, value in enumerate(obj):
            t, s = flatten(value, f"{prefix}/{i}")
            tensors.update(t)
            items.append(s)
        return tensors, items
    return {}, obj


def unflatten(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__items__" in skeleton:
        return {k: unflatten(tensors, v) for k, v in skeleton["__items__"]}
    if isinstance(skeleton, list):
        return [unflatten(tensors, v) for v in skeleton]
    return skeleton


def to_records(obj: Any) -> tuple[ArrayRecord, ConfigRecord]:
    tensors, skeleton = flatten(obj)
    return ArrayRecord(torch_state_dict=tensors) if tensors else ArrayRecord(), ConfigRecord({"json": json.dumps(
        skeleton)})


def from_records(arrays: ArrayRecord, config: ConfigRecord) -> Any:
    tensors = arrays.to_torch_state_dict() if len(arrays) else {}
    return unflatten(tensors, json.loads(str(config["json"])))


def payload_content(payload: Payload | None, **config: Any) -> RecordDict:
    """A message's content: ``config`` values plus the payload (tensors + JSON metadata), if any."""
    content = RecordDict({"config": ConfigRecord({**config, "has_payload": payload is not None})})
    if payload is not None:
        content["payload_arrays"], content["payload_meta"] = to_records({"arrays": payload.arrays,
                                                                          "meta": payload.meta})
    return content


def content_payload(content: RecordDict) -> Payload | None:
    if not content["config"]["has_payload"]:
        return None
    data = from_records(content["payload_arrays"], content["payload_meta"])
    return Payload(dict(data["arrays"]), dict(data["meta"]))


# ---------------------------------------------------------------------------------------------- configuration
@lru_cache(maxsize=4)
def load_config(config_args: tuple[str, ...]) -> tuple[Any, Any]:
    """Parse a ``lightning-methods-fed`` command line once per process: ``(parser, namespace)``."""
    from lightning_methods.federated.cli import build_parser

    parser = build_parser()
    return parser, parser.parse_args(list(config_args))


def config_args_from_context(context: Context) -> tuple[str, ...]:
    """``--config <run_config["config"]> <run_config["overrides"]>`` of a Flower run (``flwr run``)."""
    if "config" not in context.run_config:
        raise ValueError("the Flower run config has no 'config' key: set config = \"path/to/fed.yaml\" in "
                         "[tool.flwr.app.config] of the Flower app's pyproject.toml")
    return ("--config", str(context.run_config["config"]), *shlex.split(str(context.run_config.get("overrides", ""))))


def federation_info(config_args: tuple[str, ...]) -> tuple[Any, FederationInfo]:
    """The server side of a config: the algorithm object and the federation description (no data is loaded)."""
    from lightning_methods.federated.config import assign_families

    parser, cfg = load_config(config_args)
    init = parser.instantiate(cfg)  # the DataModule is built (its class count is known) but no data is loaded
    fed, n = init.federation, init.data.num_clients
    families = assign_families(fed.families, n, fed.assignment, fed.seed)
    return init.algorithm, FederationInfo(num_clients=n, num_classes=init.data.num_classes, families=families,
                                          seed=fed.seed, feature_dim=fed.feature_dim, stem=fed.stem,
                                          rounds=fed.rounds, image_size=getattr(init.data, "image_size", 32))


# ---------------------------------------------------------------------------------------------- server
class AlgorithmStrategy(Strategy):
    """A Flower strategy that runs a :class:`~.algorithm.FedAlgorithm`'s server side (full participation).

    Args:
        algorithm: the algorithm object (``setup_server`` is called here).
        info: the federation (number of clients, classes, families, seed, rounds).
        out_dir: where ``history.json`` and the final ``server_state.pt`` are written (``None``: nowhere).
        wait_s: how long to wait for all nodes to connect.
    """

    def __init__(self, algorithm: Any, info: FederationInfo, out_dir: str | Path | None = None,
                 wait_s: float = 600.0) -> None:
        self.algorithm, self.info, self.wait_s = algorithm, info, wait_s
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.algorithm.setup_server(info)
        self.node_client: dict[int, int] = {}
        self.history: list[dict[str, Any]] = []
        self._record: dict[str, Any] = {}

    def summary(self) -> None:
        print(f"AlgorithmStrategy({self.algorithm.name}): {self.info.num_clients} clients, {self.info.rounds} rounds")

    def _learn_nodes(self, grid: Grid) -> None:
        start = time.time()
        while len(nodes := list(grid.get_node_ids())) < self.info.num_clients:
            if time.time() - start > self.wait_s:
                raise TimeoutError(f"only {len(nodes)} of {self.info.num_clients} Flower nodes connected in "
                                   f"{self.wait_s:.0f} s; start one SuperNode per client (partition-id 0..n-1)")
            time.sleep(0.5)
        unknown = [n for n in nodes if n not in self.node_client]
        if unknown:
            queries = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query")
                       for n in unknown]
            for reply in grid.send_and_receive(queries):
                self._check(reply)
                self.node_client[reply.metadata.src_node_id] = int(reply.content["metrics"]["client_id"])
        ids = sorted(self.node_client.values())
        if ids != list(range(self.info.num_clients)):
            raise ValueError(f"the Flower nodes report client ids {ids}; expected each of "
                             f"0..{self.info.num_clients - 1} exactly once (node_config partition-id)")

    @staticmethod
    def _check(reply: Message) -> None:
        if reply.has_error():
            raise RuntimeError(f"a Flower client failed: {reply.error.reason}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._learn_nodes(grid)
        return [Message(payload_content(self.algorithm.initial_download(cid) if server_round == 1 else None,
                                        round=server_round), dst_node_id=node, message_type="train")
                for node, cid in sorted(self.node_client.items(), key=lambda kv: kv[1])]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        uploads = {}
        for reply in replies:
            self._check(reply)
            uploads[int(reply.content["metrics"]["client_id"])] = content_payload(reply.content)
        if sorted(uploads) != list(range(self.info.num_clients)):
            raise RuntimeError(f"round {server_round}: uploads from clients {sorted(uploads)}, expected all "
                               f"{self.info.num_clients}")
        check_finite(uploads, f"round {server_round}: client uploads")
        t0 = time.perf_counter()
        metrics = self.algorithm.aggregate(server_round, uploads)
        check_finite({"state": self.algorithm.server_state_dict(), "downloads": self.algorithm.pending,
                      "metrics": metrics}, f"round {server_round}: server aggregation")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._record = {"round": server_round, "time/server": time.perf_counter() - t0, **scalars,
                        "aligned": metrics.get("aligned", {})}
        return ArrayRecord(), MetricRecord(scalars)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return [Message(payload_content(self.algorithm.download(cid), round=server_round), dst_node_id=node,
                        message_type="evaluate")
                for node, cid in sorted(self.node_client.items(), key=lambda kv: kv[1])]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = {}
        for reply in replies:
            self._check(reply)
            m = reply.content["metrics"]
            results[int(m["client_id"])] = (int(m["correct"]), int(m["total"]))
        correct, total = zip(*(results[c] for c in sorted(results)))
        record = {**self._record, **round_metrics(correct, total),
                  "client_acc": [c / t if t else 0.0 for c, t in zip(correct, total)]}
        self.history.append(record)
        if self.out_dir is not None:
            atomic_write_json(self.out_dir / "history.json", self.history)
            atomic_torch_save(self.algorithm.server_state_dict(), self.out_dir / "server_state.pt")
        return MetricRecord({k: v for k, v in record.items() if k.startswith("acc/")})


def make_server_app(config_args: Iterable[str] | None = None, out_dir: str | Path | None = None) -> ServerApp:
    """A ``ServerApp`` for a ``lightning-methods-fed`` config (``config_args``; ``None``: from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        args = tuple(config_args) if config_args is not None else config_args_from_context(context)
        algorithm, info = federation_info(args)
        rounds = int(context.run_config.get("num-server-rounds", info.rounds))
        target = out_dir if out_dir is not None else Path(load_config(args)[1].run_dir) / "flower"
        AlgorithmStrategy(algorithm, info, target).start(grid, ArrayRecord(), num_rounds=rounds)

    return app


# ---------------------------------------------------------------------------------------------- client
@lru_cache(maxsize=4)
def client_runtime(config_args: tuple[str, ...]) -> Any:
    """One :class:`~.local.ClientRuntime` per process and config (the data set is loaded and partitioned once)."""
    from lightning_methods.federated.config import assign_families
    from lightning_methods.federated.local import ClientRuntime

    parser, cfg = load_config(config_args)
    init = parser.instantiate(cfg)
    data = init.data
    data.prepare_data()
    data.setup()
    fed = init.federation
    families = assign_families(fed.families, data.num_clients, fed.assignment, fed.seed)
    return ClientRuntime(data, init.algorithm, fed, families, trainer=cfg.trainer)


def _save_client_state(state: dict[str, Any], context: Context) -> None:
    context.state["fed_state_arrays"], context.state["fed_state_meta"] = to_records(state)


def make_client_app(config_args: Iterable[str] | None = None) -> ClientApp:
    """A ``ClientApp`` for a ``lightning-methods-fed`` config; the node's ``partition-id`` is its client id."""
    app = ClientApp()

    def setup(context: Context) -> tuple[Any, int]:
        args = tuple(config_args) if config_args is not None else config_args_from_context(context)
        return client_runtime(args), int(context.node_config["partition-id"])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"client_id": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rt, cid = setup(context)
        round, payload = int(msg.content["config"]["round"]), content_payload(msg.content)
        if "fed_state_arrays" in context.state:
            state = from_records(context.state["fed_state_arrays"], context.state["fed_state_meta"])
            if payload is not None:
                rt.receive(cid, state, payload, round)
        else:  # first message: initialise, applying the server's initial download (as the in-process runner does)
            state = rt.init_client(cid, payload)
        upload, times = rt.fit(cid, state, round)
        _save_client_state(state, context)
        content = payload_content(upload)
        content["metrics"] = MetricRecord({"client_id": cid, "num_examples": len(rt.data.client_train[cid]),
                                           "time_train": times["train"]})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        rt, cid = setup(context)
        if "fed_state_arrays" not in context.state:
            raise RuntimeError(f"client {cid} was asked to evaluate before it trained (no state in context.state)")
        state = from_records(context.state["fed_state_arrays"], context.state["fed_state_meta"])
        payload, round = content_payload(msg.content), int(msg.content["config"]["round"])
        if payload is not None:
            rt.receive(cid, state, payload, round)
            _save_client_state(state, context)
        correct, total = rt.evaluate(cid, state, round)
        return Message(RecordDict({"metrics": MetricRecord({"client_id": cid, "correct": correct, "total": total})}),
                       reply_to=msg)

    return app


# ---------------------------------------------------------------------------------------------- ``flwr run``
#: The apps ``flwr run`` loads (``lightning_methods.federated.flower:server_app`` / ``:client_app``). They are plain
#: module attributes because Flower validates a component reference by looking for an assignment to that name in the
#: module's source; building them is cheap (no config is read, no data loaded): each reads the Flower run config
#: (``config``, ``overrides``, ``num-server-rounds``) when its first message arrives.
server_app = make_server_app()
client_app = make_client_app()
