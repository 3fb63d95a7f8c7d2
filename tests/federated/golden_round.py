"""Digests of two federated rounds on a tiny setting, to show that a change of the client-round machinery (issue 25:
one reused Trainer instead of a fresh one per client-round) leaves every number unchanged.

``python tests/federated/golden_round.py`` (one thread) writes ``golden_rounds.json`` beside this file; the golden
in the repository was recorded with the previous implementation (a fresh ``Trainer`` per client-round), before the
change. Every client weight, optimizer state, the server state and the per-round client accuracies are reduced to
SHA-256 digests of their bytes, so equality is bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden_rounds.json"
#: the algorithms covered: each class path with its init args and federation overrides
CASES: dict[str, dict[str, Any]] = {
    "fedfree_momentum": {"algorithm": ("FedFree", {"k": 2, "pseudo_batch_size": 16}),
                         "federation": {"momentum": 0.9, "keep_optimizer_state": True}},
    "fedproto": {"algorithm": ("FedProto", {}), "federation": {}},
    "fedkd": {"algorithm": ("FedKD", {"mentee_family": "fed_resnet8"}), "federation": {}},
    "fedavg": {"algorithm": ("FedAvg", {}), "federation": {}, "families": ["fedavg_cnn"]},
}


def digest(obj: Any) -> Any:
    """Tensors -> SHA-256 of their bytes (plus dtype and shape); containers recursively; other values unchanged."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        flat = t.reshape(-1)
        raw = flat.to(torch.uint8) if t.dtype == torch.bool else flat.view(torch.uint8)
        return f"{t.dtype}{list(t.shape)}:{hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:24]}"
    if isinstance(obj, dict):
        return {str(k): digest(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [digest(v) for v in obj]
    return obj


def run_case(tmp: Path, name: str) -> dict[str, Any]:
    """Two rounds of one case (3 clients, 2 training batches per client-round); returns its digests."""
    from fedfree_testing import make_runner

    import lightning_methods.federated as fed

    case = CASES[name]
    cls, kwargs = case["algorithm"]
    runner = make_runner(tmp / name, getattr(fed, cls)(**kwargs), families=case.get("families"), rounds=2,
                         **case["federation"])
    runner.run()
    return {"clients": digest(runner.clients), "server": digest(runner.algorithm.server_state_dict()),
            "client_acc": [h["client_acc"] for h in runner.history],
            "aligned": json.loads(json.dumps([h.get("aligned", {}) for h in runner.history]))}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    """What the bit-exact digests depend on besides the code (CPU kernels, torch version)."""
    return {"torch": torch.__version__, "cpu": cpu_model(), "machine": platform.machine()}


def record(path: Path = GOLDEN) -> None:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {name: run_case(Path(tmp), name) for name in CASES}
    path.write_text(json.dumps({"environment": environment(), "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    record()
