"""Shared test utilities: fake CIFAR releases in the real on-disk format, tiny models, a 2-process DDP runner."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_methods.utils import leave_process_group


def write_fake_cifar(root: str | Path, kind: str = "cifar100", n_train: int = 200, n_test: int = 100,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Write a small CIFAR release (python pickle format, as in the official tarball) under ``root``.

    Returns the written arrays: ``train_x`` / ``test_x`` (uint8 N x 3 x 32 x 32) and ``train_y`` / ``test_y``.
    CIFAR-10 training data is spread over the five ``data_batch_i`` files like the real release.
    """
    rng = np.random.default_rng(seed)
    classes = 100 if kind == "cifar100" else 10
    out = {
        "train_x": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
        "train_y": np.arange(n_train) % classes,
        "test_x": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
        "test_y": rng.permutation(np.arange(n_test) % classes),
    }
    rng.shuffle(out["train_y"])

    def dump(path: Path, x: np.ndarray, y: np.ndarray, label_key: str) -> None:
        entry = {"data": x.reshape(len(x), -1), label_key: y.tolist(), "batch_label": path.name,
                 "filenames": [f"img_{i}.png" for i in range(len(x))]}
        if kind == "cifar100":
            entry["coarse_labels"] = (y // 5).tolist()
        with open(path, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    root = Path(root)
    if kind == "cifar100":
        d = root / "cifar-100-python"
        d.mkdir(parents=True, exist_ok=True)
        dump(d / "train", out["train_x"], out["train_y"], "fine_labels")
        dump(d / "test", out["test_x"], out["test_y"], "fine_labels")
        with open(d / "meta", "wb") as f:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                         "coarse_label_names": [f"s{i}" for i in range(20)]}, f, protocol=2)
    else:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True, exist_ok=True)
        chunks = np.array_split(np.arange(n_train), 5)
        for i, c in enumerate(chunks, 1):
            dump(d / f"data_batch_{i}", out["train_x"][c], out["train_y"][c], "labels")
        dump(d / "test_batch", out["test_x"], out["test_y"], "labels")
        with open(d / "batches.meta", "wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)
    return out


class TinyNet(nn.Module):
    """Conv-BN-ReLU-pool-Linear: the smallest model with every parameter role (weight, bias, norm)."""

    def __init__(self, num_classes: int = 10, width: int = 8, in_ch: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def interrupted_fit(monkeypatch: Any, args: list[str], at_epoch: int) -> None:
    """``lightning-methods fit ARGS`` stopped by a KeyboardInterrupt (what Ctrl-C raises) at the start of epoch
    ``at_epoch``, so its ``last.ckpt`` holds epoch ``at_epoch - 1``; Lightning shuts down and exits (SystemExit)."""
    import pytest

    from lightning_methods import ImageClassifier
    from lightning_methods.cli import main

    real = ImageClassifier.on_train_epoch_start

    def kill(self: ImageClassifier) -> None:
        if self.current_epoch == at_epoch:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(ImageClassifier, "on_train_epoch_start", kill)
    try:
        with pytest.raises(SystemExit):
            main(["fit", *args])
    finally:
        monkeypatch.setattr(ImageClassifier, "on_train_epoch_start", real)


def quiet_trainer(**overrides: Any) -> L.Trainer:
    """A CPU Trainer for tests: one device, no logger, no checkpoints, no progress bar or model summary, no
    validation and no sanity check unless ``overrides`` ask for them (e.g. ``max_epochs=2, limit_val_batches=1``)."""
    args: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                limit_val_batches=0)
    args.update(overrides)
    return L.Trainer(**args)


class BatchesFreed(L.Callback):
    """Records a weak reference to every training batch's images and checks at each batch start that the images of
    the batch before the previous one are gone. Run the fit with the cyclic garbage collector off (``gc.disable()``):
    then only reference counting frees a batch, and a reference cycle in the step (a closure that refers to itself)
    keeps it alive. ``checked`` counts the batches found freed."""

    def __init__(self) -> None:
        self.refs: list[Any] = []
        self.checked = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        import weakref

        if len(self.refs) >= 2:
            assert self.refs[-2]() is None, f"the images of training batch {len(self.refs) - 2} are still alive"
            self.checked += 1
        self.refs.append(weakref.ref(batch["image"]))


class LinearModule(L.LightningModule):
    """The smallest LightningModule: a 4 -> 2 linear layer trained with cross-entropy and SGD (lr 0.1) on the
    ``(x, y)`` batches of :func:`tiny_loader`."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Worsening(LinearModule):
    """A :class:`LinearModule` whose logged ``val/acc`` falls every epoch: the best checkpoint is the first."""

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 1.0 / (self.current_epoch + 1))


def tiny_loader() -> DataLoader:
    """16 seeded samples of 4 features and 2 classes, in batches of 4."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)),
                      batch_size=4)


def write_teacher_file(directory: str | Path, arch: str, num_classes: int, seed: int = 0) -> Path:
    """A randomly initialized ``arch`` teacher in the shared CIFAR-100 teacher format (CRD / mdistiller):
    ``<directory>/<arch>_vanilla/ckpt_epoch_240.pth`` holding ``{"model": state_dict, "epoch": 240}``. BatchNorm
    running statistics are set to non-default values, so a loader that dropped them would be caught."""
    from lightning_methods.models import create_backbone

    torch.manual_seed(seed)
    model = create_backbone(arch, num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1000)
    path = Path(directory) / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 240}, path)
    return path


# Variables through which a launcher (torchrun, SLURM, MPI, LSF) would change how the workers of run_ddp form their
# group. (Seeds an earlier test left behind, PL_GLOBAL_SEED and PL_SEED_WORKERS, are removed for every test by
# conftest.py, so the workers see the same seeding environment as the test that spawns them.)
_LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "WORLD_SIZE",
                  "LOCAL_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE")
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "LSB_", "JSM_")


def free_port() -> int:
    """A free TCP port for the rendezvous store, drawn below the kernel's ephemeral port range. A port from the
    ephemeral range (what binding port 0 returns) is released before rank 0 binds it again, and in that window the
    kernel may hand it out as the source port of any outgoing connection - even of rank 1's own connection attempt to
    it, which then connects to itself. Ports below the range are never handed out that way."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    draw = random.Random()  # seeded from os.urandom, independent of the tests' seeding of the global generator
    for _ in range(200):
        port = draw.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found below the ephemeral range (starts at {low})")


def free_ports(n: int) -> list[int]:
    """``n`` different free ports (:func:`free_port`), one for each process group a ``run_ddp`` worker creates after
    its first."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


_NEXT_PORTS = "LM_TEST_NEXT_PORTS"  # run_ddp's ports for the groups a worker creates after its first


def next_group_port() -> None:
    """Make this worker's next ``init_process_group`` meet its peers on the next port ``run_ddp(..., groups=n)`` drew.
    A group created on the port of the one just left can fail: a peer that left sooner connects to the old rendezvous
    server, which rank 0 has not yet closed, and loses the connection when it closes ("Failed to recv, got 0 bytes",
    or gloo's "Connection reset by peer" when rank 0 is three seconds late)."""
    ports = os.environ.get(_NEXT_PORTS, "").split(",")
    if not ports[0]:
        raise RuntimeError("no port left for another process group: give run_ddp groups= the number of groups")
    os.environ["MASTER_PORT"], os.environ[_NEXT_PORTS] = ports[0], ",".join(ports[1:])


@contextlib.contextmanager
def _worker_environment(ports: list[int], world_size: int):
    """The environment run_ddp hands its workers: launcher variables of the parent removed, a torchrun-like set
    added, restored on exit."""
    saved = {k: v for k, v in os.environ.items() if k in _LAUNCHER_VARS or k.startswith(_LAUNCHER_PREFIXES)}
    added = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[0]), "WORLD_SIZE": str(world_size), "NODE_RANK": "0",
             "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1", _NEXT_PORTS: ",".join(map(str, ports[1:]))}
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    for key in saved:
        del os.environ[key]
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
        if saved_omp is not None:
            os.environ["OMP_NUM_THREADS"] = saved_omp
        os.environ.update(saved)


#: what the fork server imports once, so each worker it forks starts without importing them again (seconds per test)
_PRELOAD = ["torch", "torch.distributed", "lightning", "lightning_methods", "lightning_methods.classifier"]
mp.set_forkserver_preload(_PRELOAD)


def _ddp_worker(rank: int, fn: Callable, world_size: int, outdir: str, args: tuple, env: dict[str, str]) -> None:
    os.environ.clear()  # the test's environment now, not the fork server's from when it started
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    result = fn(rank, world_size, *args)
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    leave_process_group()  # all ranks together, without the teardown races (see its docstring)


def run_ddp(fn: Callable[..., Any], world_size: int = 2, args: tuple = (), groups: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` CPU processes and return their results.

    The environment is set as an external launcher (torchrun) would, so inside ``fn`` either
    ``torch.distributed.init_process_group("gloo")`` or ``Trainer(accelerator="cpu", devices=world_size,
    strategy="ddp")`` joins the group without spawning. ``fn`` must be a module-level function; its return value
    must be picklable by ``torch.save``.

    Deterministic set-up and tear-down: a fresh port per call, drawn outside the kernel's ephemeral range
    (:func:`free_port`), workers forked by multiprocessing's fork server (a fresh single-threaded process that
    imported torch, Lightning and the package once: a spawned worker spent seconds importing them, and 19 DDP tests
    took 148 s instead of 34 s; never a fork of the test process, which has threads) with the test's environment and
    working folder of the moment, without the parent's launcher variables, and every worker leaves
    the process group after a barrier, so no rank exits while its peer still talks to it (the gloo thread of the peer
    would abort the process). ``fn`` may create and destroy process groups itself, one after another, each after the
    first on a port of its own (``groups`` ports are drawn; :func:`next_group_port` before each later group); a
    ``fn`` that wraps a model in ``DistributedDataParallel`` leaves its last group to this teardown (the wrapper,
    freed when ``fn`` returns, would otherwise be what destroys the group, without the pause the teardown makes).
    """
    with tempfile.TemporaryDirectory() as outdir, _worker_environment(free_ports(groups), world_size):
        mp.start_processes(_ddp_worker, args=(fn, world_size, outdir, args, dict(os.environ)), nprocs=world_size,
                           join=True, start_method="forkserver")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def read_wandb_records(path: str | Path) -> list:
    """Decode an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then LevelDB-log framing (32 KiB
    blocks, 7-byte record headers: crc32, length, type FULL/FIRST/MIDDLE/LAST) around protobuf ``Record``s."""
    import struct

    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()  # the service process writes the file, in some releases after wandb.finish() returned
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += block - pos % block if pos % block else 0
        elif kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending + chunk)
            records.append(rec)
            pending = b""
        else:
            pending += chunk
    return records


def signature_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """``{argument: default}`` of ``fn``'s (or a class's ``__init__``'s) signature, for tests that pin a spec's
    defaults."""
    import inspect

    params = inspect.signature(fn).parameters.items()
    return {k: p.default for k, p in params if p.default is not inspect.Parameter.empty}

