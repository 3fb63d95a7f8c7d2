"""Records of the multi-stage commands, read by ``lightning-methods table`` like the records of ``fit``.

``lightning-methods fed`` writes ``<run_dir>/<algorithm>/results.json`` (``{"summary", "clients", "source"}``) and
``lightning-methods select`` writes ``<run_dir>/summary.json``; both keep ``source`` (:func:`command_source`: the
config files and the seed of the command) so that their runs group over seeds and show the paper's numbers named on
the config's ``# paper:`` lines (``final_mean``, ``test_acc_max_over_all_epochs_and_rounds``, ...).
:func:`adapt` turns either file into the fields of a record (:func:`~lightning_methods.results.record.read_record`
adds the format); the resolved
config comes from ``config.yaml`` beside the file (written by :class:`~lightning_methods.runs.StagedRun`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

#: Summary values of a federated run (fractions of 1, shown in percent by the table).
FEDERATED_METRICS = ("final_mean", "final_std", "final_weighted", "best_mean", "best_std", "best_weighted")
#: Summary values of an Early Cutting run (fractions of 1).
SELECTION_METRICS = ("test_acc_last", "test_acc_at_best_val", "test_acc_max_over_all_epochs_and_rounds")
#: Config keys that hold a seed or only say where and how a multi-stage run is kept (dropped when grouping runs).
SEED_AND_RUN_KEYS = (("seed_everything",), ("data", "seed"), ("federation", "seed"), ("data", "init_args", "seed"),
                     ("run_dir",), ("resume",), ("progress",), ("profile_steps",), ("stop_after_round",),
                     ("compare_with",), ("logger",), ("config",), ("seed",), ("cache_dir",), ("cache_policy",),
                     ("stop_after",))
#: Metrics of an EncMin2L report (``lightning-methods ood``), per detector and OOD set / group mean, x 100.
OOD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")


def command_source(config: Any, seed: Any) -> dict[str, Any]:
    """``{"config": [absolute paths of the --config files], "seed": seed}`` of a parsed jsonargparse config."""
    files = config.get("config") if hasattr(config, "get") else None
    paths = [os.fspath(getattr(f, "absolute", f)) for f in (files or []) if f is not None]
    return {"config": paths, "seed": seed}


def _resolved_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        config = None
    config = config if isinstance(config, dict) else {}
    for keys in SEED_AND_RUN_KEYS:
        parent = config
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(keys[-1], None)
    return config


def _record(path: Path, source: Mapping[str, Any], name: str, status: str, metrics: Mapping[str, Any],
            config: dict[str, Any], paper_config: bool, combination: dict[str, Any] | None = None) -> dict[str, Any]:
    files = list(source.get("config") or [])
    info = {"name": name, "seed": source.get("seed"), "config": files[-1] if files and paper_config else None}
    if combination:
        info["combination"] = combination
    return {"command": "fit", "status": status, "run_dir": str(path.parent), "path": str(path),
            "config_path": files, "config": config, "seed": source.get("seed"),
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, "info": info}


def _grid_stem(path: Path, stem: str) -> tuple[str, dict[str, Any] | None]:
    """The config name and ``--set`` combination of a grid run (``GRID/<config>/[<combination>/]seed<k>/`` holding
    ``run.yaml``, with the record at ``{fed/<algorithm>,ood/report}/results.json`` below it; the command ran on the
    grid's ``run.yaml``), else ``(stem, None)``. The combination holds the run's values of the grid's ``--set`` keys
    (recorded as ``swept`` in the configuration's ``state.json``), so its rows are named as ``fit`` grid rows are:
    the config name plus the ``--set`` values."""
    if stem != "run" or len(path.parents) < 4 or not (path.parents[2] / "run.yaml").is_file():
        return stem, None
    run_dir = path.parents[2]
    for config_dir in list(run_dir.parents)[:2]:  # GRID/<config>/seed<k> or GRID/<config>/<combination>/seed<k>
        try:
            state = json.loads((config_dir / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict) or state.get("kind") != "grid":
            continue
        swept = (state.get("fingerprint") or {}).get("swept") or []
        try:
            config = yaml.safe_load((run_dir / "run.yaml").read_text())
        except yaml.YAMLError:
            config = None
        combination = {key: _get_key(config, key) for key in swept} if isinstance(config, dict) else {}
        return config_dir.name, combination or None
    return path.parents[3].name, None


def _get_key(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def adapt(path: str | Path, data: Any) -> dict[str, Any] | None:
    """A record from a federated ``results.json``, an Early Cutting ``summary.json`` or an EncMin2L
    ``report/results.json`` (``None`` for other files)."""
    path = Path(path)
    if not isinstance(data, dict):
        return None
    if path.parent.name == "report" and isinstance(data.get("detectors"), list) and "groups" in data:
        return _ood_record(path, data)
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    stem, combination = _grid_stem(path, Path(source["config"][-1]).stem if source.get("config") else path.parent.name)
    summary = data.get("summary")
    if isinstance(summary, dict) and "algorithm" in summary and isinstance(data.get("clients"), list):
        config = _resolved_config(path.parent)
        algorithm = str(summary["algorithm"])
        config["algorithm"] = algorithm  # one results.json per algorithm: compare_with runs share the config file
        primary = source.get("algorithm", algorithm) == algorithm  # the config's paper numbers are its algorithm's
        metrics = {k: summary.get(k) for k in FEDERATED_METRICS}
        return _record(path, source, f"{stem}:{algorithm}", status="finished", metrics=metrics, config=config,
                       paper_config=primary, combination=combination)
    if path.name == "summary.json" and any(k in data for k in SELECTION_METRICS) and "rounds" in data:
        status = "finished" if data.get("status") == "done" else str(data.get("status"))
        metrics = {k: data.get(k) for k in SELECTION_METRICS}
        return _record(path, source, stem, status=status, metrics=metrics, config=_resolved_config(path.parent),
                       paper_config=True, combination=combination)
    return None


def _ood_record(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """An EncMin2L report as a record: ``ood/<detector>/<set or group>_mean/<metric>`` in percent (x 100, the unit
    of the configs' ``# paper:`` lines), the resolved config from the run's ``config.yaml``."""
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    stem, combination = _grid_stem(path, Path(source["config"][-1]).stem if source.get("config")
                                   else path.parent.parent.name)
    metrics: dict[str, float] = {}
    for det in data["detectors"]:
        for name, values in [
            *(det.get("metrics") or {}).items(),
            *((f"{g}_mean", v) for g, v in (det.get("means") or {}).items()),
        ]:
            for m in OOD_METRICS:
                if isinstance(values.get(m), (int, float)):
                    metrics[f"ood/{det['name']}/{name}/{m}"] = 100.0 * float(values[m])
    record = _record(
        path,
        source,
        stem,
        status="finished",
        metrics=metrics,
        config=_resolved_config(path.parent.parent),
        paper_config=True,
        combination=combination,
    )
    record["environment"] = data.get("environment")
    return record
