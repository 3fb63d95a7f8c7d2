"""Client-side steps shared by both runtimes: initialise a client, train it for one round with a quiet Trainer,
apply a server message, evaluate it. The in-process runner and the Flower ClientApp both call these, so a round
computes the same thing in either runtime.

One Trainer serves every client-round of a runtime (issue 25: constructing a Trainer per client-round cost about a
tenth of client training): before each fit its fit loop is replaced by a fresh one (:func:`reset_fit_loop`), so
epoch, step and batch counters start from zero exactly as in a new Trainer, and ``fit`` attaches the new module and
the client's loaders as usual. ``reuse_trainer=False`` builds a fresh Trainer per client-round instead (the previous
behaviour; both give bit-identical rounds: tested). Each client-round runs under
:class:`~lightning_methods.callbacks.nonfinite_guard.NonFiniteGuard` (:class:`ClientRoundGuard`: the loss every step,
the weights once per client-round): a client whose loss or weights become NaN / inf
stops the run with :class:`~lightning_methods.callbacks.nonfinite_guard.NonFiniteTrainingError` naming the client
and round, before anything of that round is recorded.

A client's state is a plain dict ``{"weights": state dict (CPU), "extra": algorithm state, "optimizer": state or
None}``. Randomness is keyed: initialisation by (seed, client), dropout by (seed, round, client); data order and
augmentation by (seed, client, round) in :class:`~lightning_methods.datamodules.FederatedDataModule`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from lightning_methods.callbacks.nonfinite_guard import NonFiniteGuard, NonFiniteTrainingError
from lightning_methods.datamodules.federated import FederatedDataModule
from lightning_methods.federated.algorithm import ClientData, ClientInfo, FedAlgorithm, Payload, build_net, cpu_state
from lightning_methods.federated.client import evaluate_client
from lightning_methods.federated.config import FederationConfig
from lightning_methods.utils import mix_seed

CLIENT_INIT_KEY, DROPOUT_KEY, PERSONALIZE_KEY = 101, 202, 303
#: Trainer settings every client-round uses: no logger, checkpoints, progress bar, summary or validation.
QUIET_TRAINER = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                 "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0}


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer info lines and possible-user warnings during client fits."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                                              "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PossibleUserWarning)
            # emitted by Lightning's own pytree helper on every fit with recent torch (not actionable here)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class StepTimer(Callback):
    """Wall time spent inside training batches (forward, backward, step), to split off per-round overhead."""

    def __init__(self, sync: bool = False) -> None:
        self.total, self.sync, self._t0 = 0.0, sync, 0.0

    def _now(self) -> float:
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = self._now()

    def on_train_batch_end(self, *args: Any) -> None:
        self.total += self._now() - self._t0


class ClientRoundGuard(NonFiniteGuard):
    """:class:`NonFiniteGuard` for client-rounds: the loss after every step (as the guard does), the weights and
    buffers once, at the end of the client-round (what the upload, the server and the round checkpoint receive) -
    not also at the end of each epoch - with a one-pass test per tensor: a float sum is NaN / inf when an element is
    (it can also overflow for weights near 1e38 / numel, which a diverging client reaches only on its way to inf)."""

    remedy = "Lower --federation.lr (the clients' learning rate) or the algorithm's own step sizes"

    def __init__(self) -> None:
        super().__init__(param_check_every_n_steps=0)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        pass  # the end-of-training check below covers the client-round; the per-step loss check runs every step

    def _params_bad(self, pl_module: Any) -> torch.Tensor:
        sums = [t.detach().sum() for _, t in self._state(pl_module)]
        if not sums:
            return torch.zeros((), dtype=torch.bool, device=pl_module.device)
        return ~torch.isfinite(torch.stack([s.to(pl_module.device, torch.float32) for s in sums])).all()


def reset_fit_loop(trainer: Trainer) -> None:
    """Give ``trainer`` a fresh fit loop (epoch, batch, step and scheduler progress at zero, no stop request), as
    ``Trainer.__init__`` builds it, so that the next ``fit`` runs exactly like the first fit of a new Trainer."""
    old = trainer.fit_loop
    loop = _FitLoop(trainer, min_epochs=old.min_epochs, max_epochs=old.max_epochs)
    loop.epoch_loop = _TrainingEpochLoop(trainer, min_steps=old.epoch_loop.min_steps,
                                         max_steps=old.epoch_loop.max_steps)
    trainer.fit_loop = loop
    trainer.should_stop = False


class ClientRuntime:
    """Runs client steps in one process (see the module docstring).

    Args:
        data: the federated DataModule (set up lazily).
        algorithm: the algorithm object (its client-side methods are used).
        federation: local epochs, optimizer settings, seed, feature width, stem.
        families: every client's family.
        trainer: keyword arguments of the client-round Trainers (accelerator, devices, precision, ...).
        profile_steps: synchronise the GPU around each training step to time the steps exactly.
        reuse_trainer: one Trainer for every client-round (default) or a fresh one per client-round (the previous
            behaviour; the same numbers, more overhead).
    """

    def __init__(self, data: FederatedDataModule, algorithm: FedAlgorithm, federation: FederationConfig,
                 families: list[str], trainer: Mapping[str, Any] | None = None, profile_steps: bool = False,
                 reuse_trainer: bool = True) -> None:
        self.data, self.algorithm, self.fed, self.families = data, algorithm, federation, families
        self.trainer_kwargs = {"accelerator": "auto", "devices": 1, **dict(trainer or {}), **QUIET_TRAINER,
                               "max_epochs": federation.local_epochs}
        devices = self.trainer_kwargs["devices"]
        if not (devices in (1, "1") or (isinstance(devices, (list, tuple)) and len(devices) == 1)):
            raise ValueError(f"trainer.devices={devices!r}: clients train one after another on one device each; "
                             "set trainer.devices to 1 (or [gpu_id]), or run clients in parallel with the Flower "
                             "runtime (one SuperNode per device, docs/methods/federated.md)")
        accel = str(self.trainer_kwargs["accelerator"])
        self.device = torch.device("cuda" if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")
        self.profile_steps, self.reuse_trainer = profile_steps, reuse_trainer
        self._shells: dict[str, nn.Module] = {}
        self._trainer: Trainer | None = None
        self._timer = StepTimer(sync=profile_steps)

    def trainer(self) -> Trainer:
        """The Trainer of the next client-round: the runtime's one Trainer with a fresh fit loop (or a new Trainer
        with ``reuse_trainer=False``), with a step timer and a non-finite guard."""
        self._timer.total = 0.0
        if self._trainer is None or not self.reuse_trainer:
            self._trainer = Trainer(**self.trainer_kwargs, callbacks=[self._timer, ClientRoundGuard()])
        else:
            reset_fit_loop(self._trainer)
        return self._trainer

    def info(self, i: int, round: int = 0) -> ClientInfo:
        f = self.fed
        return ClientInfo(client_id=i, family=self.families[i], num_classes=self.data.num_classes,
                          num_examples=len(self.data.client_train[i]), round=round,
                          seed=mix_seed(f.seed, CLIENT_INIT_KEY, i), lr=f.lr, momentum=f.momentum,
                          weight_decay=f.weight_decay, feature_dim=f.feature_dim, stem=f.stem,
                          image_size=getattr(self.data, "image_size", 32))

    def init_client(self, i: int, payload: Payload | None = None) -> dict[str, Any]:
        """Client ``i`` before round 1: seeded initialisation, then the server's initial download ``payload``
        (:meth:`~.algorithm.FedAlgorithm.initial_download`), if any."""
        if not self.data.client_train:
            self.data.setup()
        info = self.info(i)
        net = build_net(info.family, info, info.seed, self.fed.feature_dim, self.fed.stem)
        self.algorithm.validate_client(net, info)
        extra = self.algorithm.init_client(net, info)
        if payload is not None:
            self.algorithm.apply_download(net, extra, payload, info)
        return {"weights": cpu_state(net), "extra": extra, "optimizer": None}

    def net(self, i: int, client: Mapping[str, Any]) -> nn.Module:
        """Client ``i``'s network: the shared network of its family with the client's weights loaded."""
        family = self.families[i]
        if family not in self._shells:
            self._shells[family] = build_net(family, self.info(i), 0, self.fed.feature_dim, self.fed.stem)
        shell = self._shells[family].to(self.device)
        shell.load_state_dict(client["weights"])
        return shell

    def fit(self, i: int, client: dict[str, Any], round: int) -> tuple[Payload, dict[str, float]]:
        """Local update of client ``i`` in ``round`` (``client`` is updated in place); returns the upload and timings
        (``train``: the whole client-round, ``steps``: inside training steps)."""
        t0 = time.perf_counter()
        info = self.info(i, round)
        net = self.net(i, client)
        module = self.algorithm.make_module(net, client["extra"], info)
        if self.fed.keep_optimizer_state and client["optimizer"] is not None:
            module.initial_optimizer_state = client["optimizer"]
        self.data.set_client(i, round)
        failure = None
        with quiet_lightning():
            trainer = self.trainer()
            torch.manual_seed(mix_seed(self.fed.seed, DROPOUT_KEY, round, i))
            try:
                trainer.fit(module, datamodule=self.data)
            except NonFiniteTrainingError as err:
                failure = err
        if failure is not None:  # raised outside the handler: the guard's own message stays out of the chain
            self._trainer = None  # a Trainer whose fit failed is not reused
            raise NonFiniteTrainingError(
                f"federated client {i} ({info.family}) diverged in round {round} (local lr={info.lr:g}, momentum="
                f"{info.momentum:g}); the round is not recorded. Lower federation.lr (or the algorithm's own rates) "
                f"and rerun in a new run_dir. The guard's report: {failure}")
        net.to(self.device)
        data = ClientData(lambda: self.data.client_loader(i, "train"), self.data.normalize_batch, self.device)
        self.algorithm.after_fit(module, client["extra"], info, data)
        upload = self.algorithm.upload(client["weights"], net, client["extra"], info)
        client["weights"] = cpu_state(net)
        if self.fed.keep_optimizer_state:
            client["optimizer"] = module.optimizer_state()
        return upload, {"train": time.perf_counter() - t0, "steps": self._timer.total}

    def receive(self, i: int, client: dict[str, Any], payload: Payload, round: int = 0) -> None:
        """Apply a server message to client ``i`` (``client`` is updated in place)."""
        net = self.net(i, client)
        self.algorithm.apply_download(net, client["extra"], payload, self.info(i, round))
        client["weights"] = cpu_state(net)

    def evaluate(self, i: int, client: Mapping[str, Any], round: int = 0) -> tuple[int, int]:
        """``(correct, total)`` of client ``i`` on its local test set after ``round``, after the algorithm's
        :meth:`~.algorithm.FedAlgorithm.personalize` (its training batches shuffled by (seed, round, client))."""
        net = self.net(i, client)
        seed = mix_seed(self.fed.seed, PERSONALIZE_KEY, round, i)
        data = ClientData(lambda: self.data.client_loader(i, "train", train=True, seed=seed), self.data.normalize_batch,
                          self.device)
        net.train()
        self.algorithm.personalize(net, client["extra"], self.info(i, round), data)
        net.eval()
        try:
            return evaluate_client(self.algorithm.predictor(net, client["extra"]), self.data.client_loader(i, "test"),
                                   self.data.normalize_batch, self.device)
        finally:
            net.train()
