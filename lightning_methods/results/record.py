"""The run record: what ``results.json`` and ``metrics.csv`` hold, and the pure functions that build and read them.

A record (``results.json``, format :data:`FORMAT`) is a JSON object::

    {"format": "lightning-methods-results/1", "command": "fit", "status": "finished", "run_id": "...",
     "run_dir": "...", "config_path": [...], "config_files": [{"path", "sha256"}], "config_hash": "...",
     "config": {...resolved config...}, "seed": 0, "versions": {...}, "device": {...},
     "epochs_completed": 12, "global_step": 240, "wall_time_s": 41.3,
     "monitor": "val/acc", "mode": "max",
     "best": {"epoch": 9, "metrics": {"val/acc": 0.98, ...}}, "last": {"epoch": 11, "metrics": {...}},
     "test": {"checkpoint": ".../best-009.ckpt", "metrics": {"test/acc": 0.97, ...}},
     "checkpoints": {"best": "...", "last": "...", "best_score": 0.98},
     "metrics": {"best/val/acc": 0.98, "best/epoch": 9, "last/val/acc": ..., "test/acc": ...},
     "info": {...}}

``metrics`` is the flat view the table builder and the W&B summary use. ``metrics.csv`` holds one row per training
epoch (``epoch`` is Lightning's 0-based epoch, as in checkpoint names) with every epoch-level metric.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import platform
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

FORMAT = "lightning-methods-results/1"
#: Libraries whose versions every record names.
LIBRARIES = ("lightning_methods", "torch", "lightning", "torchmetrics", "torchvision", "timm", "wandb", "numpy",
             "jsonargparse")


def run_directory(trainer: Any) -> Path:
    """The directory of a run: the parent of its ``checkpoints/`` folder, where Lightning puts it.

    An explicit ``ModelCheckpoint(dirpath=".../checkpoints")`` gives its parent; otherwise the directory follows
    Lightning's own rule for checkpoints: ``<save_dir>/<name>/<version>`` of the first logger (for a ``WandbLogger``:
    ``<save_dir>/<project>/<run id>``), or ``default_root_dir`` without a logger.
    """
    ckpt = getattr(trainer, "checkpoint_callback", None)
    dirpath = getattr(ckpt, "dirpath", None)
    if dirpath and Path(dirpath).name == "checkpoints":
        return Path(dirpath).parent
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        return Path(save_dir) / str(logger.name) / version
    return Path(trainer.default_root_dir)


def to_float(value: Any) -> float | None:
    """A logged value (tensor, numpy or python scalar) as a float; ``None`` for non-scalars."""
    if hasattr(value, "numel") and value.numel() != 1:
        return None
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Epoch-level scalars of ``trainer.callback_metrics``: step values (``*_step``) are dropped, and ``x_epoch``
    is dropped when ``x`` is there too (Lightning reports both names for the same value)."""
    out = {}
    for key, value in metrics.items():
        if key.endswith("_step") or (key.endswith("_epoch") and key[: -len("_epoch")] in metrics):
            continue
        number = to_float(value)
        if number is not None:
            out[key] = number
    return dict(sorted(out.items()))


def is_better(value: float, best: float | None, mode: str) -> bool:
    """``value`` improves on ``best`` (strictly, so ties keep the earlier epoch, as ModelCheckpoint does)."""
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def best_and_last(history: Sequence[Mapping[str, Any]], monitor: str, mode: str = "max"
                  ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The epoch rows where ``monitor`` is best (first on ties) and the last row that has ``monitor``, each as
    ``{"epoch", "metrics": {validation metrics of that epoch}}``.

    Args:
        history: epoch rows (``{"epoch": int, metric: value, ...}``).
        monitor: the metric that decides "best" (``val/acc``).
        mode: ``"max"`` or ``"min"``.

    Raises:
        ValueError: for another ``mode``.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    best_row, best_value, last_row = None, None, None
    for row in history:
        value = row.get(monitor)
        if value is None:
            continue
        last_row = row
        if is_better(float(value), best_value, mode):
            best_row, best_value = row, float(value)

    def view(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        return {"epoch": row["epoch"], "metrics": {k: v for k, v in row.items() if k.startswith("val")}}

    return view(best_row), view(last_row)


def flat_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The flat metrics of a record: ``best/<metric>``, ``best/epoch``, ``last/<metric>``, ``last/epoch``,
    the test metrics under their own names, and the standalone validation metrics under theirs."""
    out: dict[str, float] = {}
    for part in ("best", "last"):
        view = record.get(part)
        if view:
            out[f"{part}/epoch"] = view["epoch"]
            out.update({f"{part}/{k}": v for k, v in view["metrics"].items()})
    for part in ("validate", "test"):
        view = record.get(part)
        if view:
            out.update(view["metrics"])
    return out


def config_hash(config: Any) -> str:
    """SHA-256 of a config's canonical JSON (sorted keys): equal configs give equal hashes."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def versions() -> dict[str, str]:
    """Versions of Python and of :data:`LIBRARIES` (``"missing"`` when one is not installed)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    revision = source_revision()
    if revision:
        out["lightning_methods_git"] = revision
    return out


def source_revision() -> str | None:
    """The git commit of the package's source tree (``"<sha> (modified)"`` with uncommitted changes to tracked
    files), or ``None`` for an installed copy or without git."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha} (modified)" if dirty else sha


def device_info(trainer: Any) -> dict[str, Any]:
    """Where the run ran: accelerator, device name, world size, precision, host, the CPU model and torch's intra-op
    thread count (float results on CPU depend on both)."""
    import torch

    root = trainer.strategy.root_device
    name = torch.cuda.get_device_name(root) if root.type == "cuda" else (cpu_model() or platform.machine())
    return {"accelerator": root.type, "name": name, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "precision": str(trainer.precision), "host": socket.gethostname(), "cpus": os.cpu_count(),
            "cpu": cpu_model(), "threads": torch.get_num_threads()}


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``; ``""`` when unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def metrics_csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """CSV text of epoch rows: ``epoch, step, time_s, lr`` first, then every metric, sorted."""
    rows = list(rows)
    first = ["epoch", "step", "time_s", "lr"]
    keys = sorted({k for row in rows for k in row} - set(first))
    columns = [k for k in first if any(k in row for row in rows)] + keys
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return buf.getvalue()


def _csv_value(value: Any) -> Any:
    return "" if value is None else (f"{value:.9g}" if isinstance(value, float) else value)


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv`` as dicts of floats (empty cells left out; ``epoch``/``step`` as ints)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, float] = {}
            for key, value in raw.items():
                if value not in ("", None):
                    row[key] = int(float(value)) if key in ("epoch", "step") else float(value)
            rows.append(row)
    return rows


def read_record(path: str | Path) -> dict[str, Any] | None:
    """A ``results.json`` of this package, or the results of ``lightning-methods fed`` / ``select`` as a record
    (:mod:`.multistage`); ``None`` for JSON files of another format (e.g. other tools' results).

    Raises:
        ValueError: the file is not valid JSON.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the run that wrote it was probably killed while "
                         "writing: rerun it, or delete the file") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        from lightning_methods.results.multistage import adapt

        adapted = adapt(path, data)  # lightning-methods fed / select results, or None
        return None if adapted is None else {"format": FORMAT, **adapted}
    data.setdefault("run_dir", str(path.parent))
    data["path"] = str(path)
    return data


def find_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every record in ``paths``: ``results*.json`` files given directly, or found below given directories.

    Raises:
        FileNotFoundError: a path that does not exist, or no record at all.
    """
    records, seen = [], set()
    for entry in paths:
        entry = Path(entry).expanduser()
        if not entry.exists():
            raise FileNotFoundError(f"{entry} does not exist (give run directories, a grid directory or results.json "
                                    "files)")
        files = [entry] if entry.is_file() else sorted([*entry.rglob("results*.json"), *entry.rglob("summary.json")])
        for file in files:
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            record = read_record(file)
            if record is not None:
                records.append(record)
    if not records:
        raise FileNotFoundError(f"no results.json of lightning-methods below {', '.join(map(str, paths))}; runs "
                                "write one when they are started with `lightning-methods fit` (ResultsWriter)")
    return records
