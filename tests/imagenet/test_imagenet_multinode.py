"""The documented multi-machine launches (docs/imagenet.md section 3), played on one machine with two CPU processes
as two nodes of one device each: ``torchrun --nnodes 2`` (two agents meeting at a c10d rendezvous) and the
environment ``srun`` gives two tasks on two nodes (``SLURM_*``). Each runs the installed ``lightning-methods fit`` with
a shipped config, ``--trainer.num_nodes 2``, on a converted (streaming) data set: Lightning picks the launcher's
cluster environment, the processes are node 0 and node 1, every training sample is seen once per epoch across the
nodes, the validation set is shared evenly, and only global rank 0 writes the run's files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from imagenet_tiny_tree import write_imagenet_tree

from lightning_methods.cli import main

from helpers import free_port

pytest.importorskip("litdata")

BIN = Path(sys.executable).parent
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "imagenet" / "demo_photos.yaml"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """4 classes x 6 training and x 2 validation images, converted in small chunks."""
    tmp = tmp_path_factory.mktemp("multinode")
    root = write_imagenet_tree(tmp / "tree", classes=4, per_class=6, val_per_class=2)
    main(["prepare-data", "convert", str(root), str(tmp / "conv"), "--num_workers", "1", "--chunk_bytes", "3kb"])
    return tmp / "conv"


def _fit_args(conv: Path, out: Path) -> list[str]:
    return ["fit", "--config", str(CONFIG), "--data.init_args.streaming", str(conv),
            "--data.init_args.image_size", "24", "--data.init_args.eval_resize", "28",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
            "--trainer.strategy", "ddp", "--trainer.max_epochs", "2", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=record_ranks.RecordRanks",
            "--trainer.callbacks.out_dir", str(out)]


def _environment() -> dict[str, str]:
    """This process's environment without launcher variables (a test run under a launcher must not leak into the
    launched job), with the callback's folder importable and one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))
           and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")}
    env.update(PYTHONPATH=str(Path(__file__).parent), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return env


def _launch(commands: list[tuple[list[str], dict[str, str], Path]]) -> None:
    """Start every node's command at once (the rendezvous needs them all) and wait; each must exit 0."""
    procs = []
    for cmd, env, cwd in commands:
        cwd.mkdir()
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:  # a node that timed out (its peer died at the rendezvous) leaves no process behind, children included
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]


def _check_job(out: Path, nodes: list[Path], environment: str) -> None:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["global_rank"], r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 0, 0), (1, 1, 0)]
    assert all(r["world_size"] == 2 and r["num_nodes"] == 2 and r["environment"] == environment for r in ranks)
    for epoch in range(2):  # 24 samples: 3 batches of 4 on each node, every sample once
        a, b = ranks[0]["train"][epoch], ranks[1]["train"][epoch]
        assert len(a) == len(b) == 12 and sorted(a + b) == list(range(24))
    assert ranks[0]["train"][0] != ranks[0]["train"][1]  # reshuffled each epoch
    assert len(ranks[0]["val"]) == len(ranks[1]["val"]) >= 2  # the sanity check, then one per epoch
    for a, b in zip(ranks[0]["val"], ranks[1]["val"], strict=True):  # 8 validation images, 4 on each node
        assert len(a) == len(b) == 4 and sorted(a + b) == list(range(8))
    assert json.loads((nodes[0] / "results.json").read_text())["status"] == "finished"
    assert not (nodes[1] / "results.json").exists()  # the run's files are written by global rank 0 only


def test_torchrun_two_nodes(converted, tmp_path):
    """docs/imagenet.md: ``torchrun --nnodes 2 --nproc-per-node ... --rdzv-backend c10d --rdzv-endpoint HOST:PORT
    "$(which lightning-methods)" fit ... --trainer.num_nodes 2``, one command per node."""
    port, out = free_port(), tmp_path / "ranks"
    commands = [([str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                  str(BIN / "lightning-methods"), *_fit_args(converted, out)], _environment(), tmp_path / f"node{node}")
                for node in range(2)]
    _launch(commands)
    _check_job(out, [tmp_path / "node0", tmp_path / "node1"], "TorchElasticEnvironment")


@pytest.mark.slow  # 7 s; the torchrun launch above runs by default (the same code path past the environment)
def test_slurm_two_nodes(converted, tmp_path):
    """docs/imagenet.md's sbatch script: ``srun lightning-methods fit ... --trainer.num_nodes N`` with one task per
    device; here the variables srun sets for 2 tasks on 2 nodes (1 task each) and the same command."""
    port, out = free_port(), tmp_path / "ranks"
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NAME": "imagenet", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost", "SLURM_LOCALID": "0",
             "MASTER_PORT": str(port)}
    commands = [([str(BIN / "lightning-methods"), *_fit_args(converted, out)],
                 {**_environment(), **slurm, "SLURM_PROCID": str(node), "SLURM_NODEID": str(node)},
                 tmp_path / f"node{node}") for node in range(2)]
    _launch(commands)
    _check_job(out, [tmp_path / "node0", tmp_path / "node1"], "SLURMEnvironment")
