"""The in-process federated runtime: clients train one after another on one device, the server step runs in the
same process, every round is checkpointed, and a killed run resumes from its last completed round.

Per round (see :mod:`.algorithm`): for each client the runtime's quiet ``Trainer`` (no logger, checkpointing,
progress bar or model summary; one Trainer, a fresh fit loop per client-round, see :mod:`.local`) fits the
algorithm's LightningModule for ``local_epochs`` on the client's data; the client's upload goes to the server;
after :meth:`~.algorithm.FedAlgorithm.aggregate` every client applies its download and is evaluated on its local
test set. Metrics go to the run's logger (one W&B run for the whole federation, step = round) and to ``history.csv``;
the per-client table goes to ``clients.csv`` and a W&B table at the end.

Memory: the weights (and extra state) of all clients live on the CPU between rounds - about ``sum over clients of
4 bytes x parameters`` (HtFE-img-8, 20.7M parameters per client on average: ~1.7 GB for 20 clients, ~8.3 GB
for 100), plus the optimizer state when it is kept; each round checkpoint holds the same on disk. The device holds
one client model (one network per family, reused) at a time.

Randomness is keyed, never global: model initialisation by (seed, client), data order and augmentation by
(seed, client, round), dropout by (seed, round, client), server pseudo-data by (seed, round, layer). A resumed run
therefore repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_methods.federated.algorithm import FedAlgorithm, FederationInfo, check_finite
from lightning_methods.federated.config import assign_families
from lightning_methods.federated.local import ClientRuntime
from lightning_methods.federated.results import round_metrics, to_csv, write_run_results
from lightning_methods.runs import StagedRun
from lightning_methods.utils import atomic_write_text, safe_torch_load
from lightning_methods.utils.quiet import quiet_wandb
from lightning_methods.utils.wandb import finish_runs, log_config, plain, wandb_loggers


def aligned_text(aligned: Mapping[int, str]) -> str:
    """``"client: local_layer<-global_layer"`` lines of one round (``"none"``: no client received a layer)."""
    return "\n".join(f"{c}: {v}" for c, v in sorted(aligned.items(), key=lambda kv: int(kv[0]))) or "none"


def build_logger(config: Mapping[str, Any] | None, run: StagedRun, stage: str) -> Any:
    """Instantiate a Lightning logger from ``{"class_path", "init_args"}`` for one stage of ``run`` (W&B: fixed id,
    name ``<name>-<stage>``, resumed after a kill). A W&B logger without a ``save_dir`` (or ``dir``) writes its
    files into the run directory, not into the working directory."""
    if not config:
        return None
    config = {"class_path": config["class_path"], "init_args": dict(config.get("init_args") or {})}
    init_args = config["init_args"]
    if config["class_path"].endswith("WandbLogger") and all(init_args.get(k) in (None, "", ".")
                                                            for k in ("save_dir", "dir")):
        init_args["save_dir"] = str(run.run_dir)
    run.stage_logger_settings({"logger": config}, stage)
    if "save_dir" in config["init_args"]:
        config["init_args"]["save_dir"] = str(Path(config["init_args"]["save_dir"] or ".").expanduser().resolve())
    module, _, name = config["class_path"].rpartition(".")
    logger = getattr(importlib.import_module(module), name)(**config["init_args"])
    quiet_wandb([logger])  # no "anonymous setting has no effect" warning
    return logger


def algorithm_fingerprint(algorithm: FedAlgorithm) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of an algorithm object given from Python: its class and its public settings
    (numbers, strings, booleans and lists of them), as a config would give them."""
    plain_types = (bool, int, float, str, type(None))
    args = {k: v for k, v in vars(algorithm).items() if not k.startswith("_")
            and (isinstance(v, plain_types) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain_types)
                                                                                     for x in v)))}
    return {"class_path": f"{type(algorithm).__module__}.{type(algorithm).__qualname__}", "init_args": args}


class FederatedRunner:
    """Runs one algorithm of a parsed ``lightning-methods-fed`` config (see the module docstring).

    Args:
        parser: the parser that produced ``config`` (:func:`lightning_methods.federated.cli.build_parser`).
        config: the parsed config: ``run_dir``, ``data`` (the federated DataModule; its ``seed`` fixes the
            partition), ``federation``, ``algorithm``, ``compare_with``, ``trainer`` (keyword arguments of the
            client-round Trainer), ``logger`` (``{"class_path", "init_args"}`` of a Lightning logger for round
            metrics, or ``None``), ``resume``, ``progress``, ``profile_steps``.
        algorithm: which algorithm of the config runs: ``0`` = ``config.algorithm``, ``i`` = ``config.compare_with[i -
            1]``; or an algorithm object (Python use: a custom or instrumented algorithm, fingerprinted by its class
            and public settings). It runs in ``run_dir/<algorithm name>/`` (a ``StagedRun`` directory: fingerprinted,
            locked, resumable).
    """

    def __init__(self, parser: Any, config: Any, algorithm: int | FedAlgorithm = 0) -> None:
        from lightning_methods.federated.cli import SECTIONS, fingerprint
        from lightning_methods.results.multistage import command_source

        init = parser.instantiate(config)
        choices = [(init.algorithm, config.algorithm), *zip(init.compare_with, config.compare_with)]
        if isinstance(algorithm, FedAlgorithm):
            self.algorithm, algorithm_config = algorithm, algorithm_fingerprint(algorithm)
        elif 0 <= algorithm < len(choices):
            self.algorithm, algorithm_config = choices[algorithm]
        else:
            raise ValueError(f"algorithm index {algorithm} out of range: the config has {len(choices)} algorithms")
        self.parser, self.config = parser, config
        self.data, self.fed = init.data, init.federation
        self.run_dir = Path(config.run_dir).expanduser() / self.algorithm.name
        self.trainer = dict(config.trainer or {})
        self.logger_config, self.resume, self.config_text = config.logger, config.resume, parser.dump(config)
        self.fingerprint = fingerprint(config, algorithm_config)
        self.sections = SECTIONS  # the config classes of its sections: settings added later resume at their defaults
        self.progress, self.profile_steps = config.progress, config.profile_steps
        self.source = {**command_source(config, config.data.seed), "algorithm": init.algorithm.name}
        self.clients: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ one round
    def run_round(self, round: int) -> dict[str, Any]:
        """One full round (train all clients, server step, deliver, evaluate); returns the round's record."""
        rt, n = self.runtime, self.data.num_clients
        times = {"time/train": 0.0, "time/steps": 0.0}
        uploads = {}
        for i in range(n):
            uploads[i], t = rt.fit(i, self.clients[i], round)
            times["time/train"] += t["train"]
            times["time/steps"] += t["steps"]
        check_finite(uploads, f"round {round}: client uploads")
        t0 = time.perf_counter()
        server = self.algorithm.aggregate(round, uploads)
        times["time/server"] = time.perf_counter() - t0
        check_finite({"state": self.algorithm.server_state_dict(), "downloads": getattr(self.algorithm, "pending", {}),
                      "metrics": server}, f"round {round}: server aggregation")
        t0 = time.perf_counter()
        evaluate = round % self.fed.eval_every == 0 or round == self.fed.rounds
        correct, total = [], []
        for i in range(n):
            payload = self.algorithm.download(i)
            if payload is not None:
                rt.receive(i, self.clients[i], payload, round)
            if evaluate:
                c, m = rt.evaluate(i, self.clients[i], round)
                correct.append(c)
                total.append(m)
        times["time/eval"] = time.perf_counter() - t0
        record = {"round": round, "local_epochs": self.fed.local_epochs, **times,
                  **{k: v for k, v in server.items() if not isinstance(v, (dict, list, str))}}
        if evaluate:
            record.update(round_metrics(correct, total))
            record["client_acc"] = [c / m if m else 0.0 for c, m in zip(correct, total)]
        record["aligned"] = server.get("aligned", {})
        return record

    # ------------------------------------------------------------------------------------------ the run
    def _checkpoint_path(self, round: int) -> str:
        return f"checkpoints/round{round:04d}.pt"

    def _restore(self, run: StagedRun) -> int:
        done = [int(s[5:]) for s in run.state.get("stages", {}) if s.startswith("round")]
        if not done:
            return 0
        last = max(done)
        state = safe_torch_load(self.run_dir / self._checkpoint_path(last), what="federated round checkpoint")
        self.clients, self.history = state["clients"], state["history"]
        self.algorithm.load_server_state_dict(state["server"])
        return last

    def _save(self, run: StagedRun, round: int) -> None:
        run.save_torch(self._checkpoint_path(round), {"round": round, "clients": self.clients, "history": self.history,
                                                       "server": self.algorithm.server_state_dict()})

    def _prune(self, run: StagedRun, round: int) -> None:
        """Delete the checkpoint that falls out of ``keep_checkpoints`` - only after ``round`` is recorded: until then a
        resume starts from the previous recorded round, whose checkpoint must still exist."""
        old = round - self.fed.keep_checkpoints
        if run.is_writer and old >= 1:
            (self.run_dir / self._checkpoint_path(old)).unlink(missing_ok=True)

    def client_table(self) -> list[dict[str, Any]]:
        """Per client: family, data sizes, classes, final and best accuracy."""
        evaluated = [h for h in self.history if "client_acc" in h]
        rows = []
        for i, stats in enumerate(self.data.stats):
            accs = [h["client_acc"][i] for h in evaluated]
            rows.append({"client": i, "family": self.families[i], "train": stats["train"], "test": stats["test"],
                         "classes": len(stats["classes"]), "final_acc": accs[-1] if accs else None,
                         "best_acc": max(accs) if accs else None})
        return rows

    def federation_info(self) -> tuple[list[str], FederationInfo]:
        """Every client's family and the server's description of the federation (after the data's ``setup``)."""
        families = assign_families(self.fed.families, self.data.num_clients, self.fed.assignment, self.fed.seed)
        return families, FederationInfo(num_clients=self.data.num_clients, num_classes=self.data.num_classes,
                                        families=families, seed=self.fed.seed, feature_dim=self.fed.feature_dim,
                                        stem=self.fed.stem, rounds=self.fed.rounds,
                                        image_size=getattr(self.data, "image_size", 32))

    def run(self) -> dict[str, Any]:
        """Run (or resume) all rounds; returns the summary (final-round and best-over-rounds accuracies)."""
        from tqdm.auto import tqdm

        self.data.prepare_data()
        self.data.setup()
        self.families, info = self.federation_info()
        with StagedRun(self.run_dir, "federated", self.fingerprint, self.resume, self.config_text,
                       sections=self.sections) as run:
            if run.is_writer:
                self.data.write_statistics(self.run_dir / "partition.json")
            self.algorithm.setup_server(info)
            self.runtime = ClientRuntime(self.data, self.algorithm, self.fed, self.families, trainer=self.trainer,
                                         profile_steps=self.profile_steps)
            start = self._restore(run)
            if start == 0:
                self.clients = [self.runtime.init_client(i, self.algorithm.initial_download(i))
                                for i in range(self.data.num_clients)]
            logger = build_logger(self.logger_config, run, self.algorithm.name)
            if logger is not None and start == 0:
                log_config([logger], {"fingerprint": self.fingerprint, "families": self.families})
                logger.log_metrics(self.data.statistics_summary(), step=0)
            bar = tqdm(range(start + 1, self.fed.rounds + 1), initial=start, total=self.fed.rounds,
                       desc=self.algorithm.name, disable=not self.progress)
            try:
                for t in bar:
                    record = self.run_round(t)
                    self.history.append(record)
                    self._save(run, t)
                    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "round"}
                    run.mark_done(f"round{t}", scalars)
                    self._prune(run, t)
                    if run.is_writer:  # the rounds so far, readable while the run goes on (rewritten at the end)
                        atomic_write_text(self.run_dir / "history.csv", to_csv(self.history))
                    if logger is not None:  # W&B also gets which clients received a layer (text)
                        text = {"server/aligned": aligned_text(record["aligned"])} if wandb_loggers([logger]) else {}
                        logger.log_metrics({**scalars, **text}, step=t)
                    if "acc/mean" in record:
                        bar.set_postfix(acc=f"{record['acc/mean']:.4f}", server=f"{record['time/server']:.2f}s")
                clients = self.client_table()
                summary = write_run_results(self.run_dir, self.algorithm.name, self.history, clients, self.source)
                for lg in wandb_loggers([logger] if logger is not None else []):
                    lg.log_table(key="clients", columns=list(clients[0]), data=[list(r.values()) for r in clients])
                    picture = self.run_dir / "accuracy.png"
                    if picture.is_file():  # the accuracy-over-rounds picture of the files, in W&B too
                        lg.log_image(key="accuracy", images=[str(picture)])
                    lg.log_metrics({f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
            finally:
                bar.close()
                if logger is not None:
                    finish_runs([logger])
        return plain(summary)
