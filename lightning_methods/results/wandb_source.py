"""Run records from a W&B project (online), in the shape of ``results.json``, for ``lightning-methods table``.

Each finished run contributes its config (the resolved config the CLI writes into the W&B run config, with the grid's
``results.info`` when a grid started it), the flat metrics the ResultsWriter puts into the run summary
(``test/acc``, ``best/val/acc``, ``last/val/acc``, ...) and, for the learning curves, its history per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_methods.results.record import FORMAT


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def record_from_run(run: Any) -> dict[str, Any]:
    """A record from a ``wandb.apis.public.Run`` (or any object with ``config``, ``summary``, ``state``, ``id``,
    ``name``, ``group`` and ``history``)."""
    config = dict(run.config)
    summary = dict(run.summary)
    metrics = {k: v for k, v in ((k, _number(v)) for k, v in summary.items()) if v is not None and not
               k.startswith("_")}
    files = config.get("config") or []
    info = dict((config.get("results") or {}).get("info") or {})
    if not info.get("name") and getattr(run, "group", None):
        info["name"] = run.group

    def history() -> list[dict[str, Any]]:
        rows: dict[int, dict[str, Any]] = {}
        for entry in run.scan_history() if hasattr(run, "scan_history") else run.history(pandas=False):
            if entry.get("epoch") is None:
                continue
            row = rows.setdefault(int(entry["epoch"]), {"epoch": int(entry["epoch"])})
            row.update({k: v for k, v in entry.items() if _number(v) is not None and not k.startswith("_")})
        return [rows[e] for e in sorted(rows)]

    return {"format": FORMAT, "command": "fit", "status": "finished" if run.state == "finished" else run.state,
            "run_id": run.id, "run_dir": None, "config": config, "config_path": files[-1] if files else None,
            "seed": config.get("seed_everything"), "info": info, "metrics": metrics, "history": history}


def wandb_records(path: str, filters: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records of the runs of the W&B project ``path`` (``entity/project`` or ``project``).

    Args:
        path: the project.
        filters: ``key=value`` run filters (``group=...``, ``state=finished``, ``config.seed_everything=0``).

    Raises:
        ValueError: a filter without ``=``.
        RuntimeError: the W&B API could not be reached (offline, not logged in).
    """
    import wandb

    query = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--filter {item!r}: expected KEY=VALUE (e.g. group=sam_on)")
        query[key if key in ("group", "state", "tags", "display_name") or key.startswith(("config.", "summary"))
              else f"config.{key}"] = value
    try:
        runs = wandb.Api().runs(path, filters=query or None)
        records = [record_from_run(run) for run in runs]
    except Exception as err:  # the public API raises several types for network and auth problems
        raise RuntimeError(f"could not read the W&B project {path!r} ({type(err).__name__}: {err}); this needs "
                           "network access and `wandb login`; offline, pass the run directories instead") from err
    return records
