"""Group runs into configurations and compute mean +- std over seeds, with the paper's numbers beside them.

Pure functions over run records (``results.json`` dicts, or the same shape built from W&B runs):

- a *configuration* is the resolved config without the seed keys and the settings that cannot change results
  (paths, loggers, workers, checkpoint and result directories); runs of one configuration differ only in their seed;
- its *label* is the grid's configuration name (``info.name``) or the stem of the config file, plus the ``--set``
  values of a grid (``rho=0.5``) and the other keys that differ between configurations of the same label;
- statistics: mean and sample standard deviation (``ddof=1``, numpy's ``std(ddof=1)``; ``ddof`` is an argument);
  accuracy-like metrics (name containing ``acc``) are shown in percent;
- paper numbers come from ``# paper: <metric>=<value>[, ...] [(source)]`` lines in the header of the config file
  (see :func:`paper_numbers`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_methods.results.gridspec import DEFAULT_SEED_KEYS, GRID_NEUTRAL, delete_key, short_names
from lightning_methods.results.record import read_metrics_csv
from lightning_methods.runs import config_fingerprint

#: Aliases accepted on ``# paper:`` lines.
PAPER_ALIASES = {"top1": "test/acc", "top5": "test/acc_top5", "acc": "test/acc"}
_PAPER_LINE = re.compile(r"^#\s*paper\s*:\s*(.+)$", re.IGNORECASE)
_PAIR = re.compile(r"([A-Za-z0-9_/@.]+)\s*=\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def paper_numbers(config_file: str | Path | None) -> dict[str, float]:
    """The paper's numbers named in a config's header comment.

    The header is the comment block at the top of the YAML file. Each line ``# paper: test/acc=84.2, test/acc_top5=
    97.0 (SAM-ON teaser figure)`` names metrics of our records (``test/acc``, ``best/val/acc``, ...; aliases
    ``top1``/``acc`` -> ``test/acc``, ``top5`` -> ``test/acc_top5``) and the paper's value, in the paper's unit
    (percent for accuracies); text in parentheses is a free-form source note. Missing file or no line: ``{}``.
    """
    out: dict[str, float] = {}
    for text in _paper_lines(config_file):
        for key, value in _PAIR.findall(re.sub(r"\([^)]*\)", "", text)):
            out[PAPER_ALIASES.get(key, key)] = float(value)
    return out


def _paper_lines(config_file: str | Path | None) -> list[str]:
    """The text after ``# paper:`` of each such line of a config's header comment (none for a missing file)."""
    if not config_file or not Path(config_file).is_file():
        return []
    lines = []
    for line in Path(config_file).read_text().splitlines():
        if not line.startswith("#"):
            if line.strip():
                break  # end of the header
            continue
        match = _PAPER_LINE.match(line.strip())
        if match:
            lines.append(match.group(1).strip())
    return lines


def paper_notes(config_file: str | Path | None) -> list[str]:
    """The header's ``# paper:`` lines that are only a parenthesized note (``(no number: ... unconfirmed)``), so
    that a listing can say why a config has no paper value (a line citing the paper is not a note)."""
    return [text for text in _paper_lines(config_file) if text.startswith("(") and text.endswith(")")
            and not _PAIR.findall(re.sub(r"\([^)]*\)", "", text))]


def is_percent(metric: str) -> bool:
    """Accuracy-like metrics are shown in percent (also the federated summaries: mean / std of client accuracy)."""
    from lightning_methods.results.multistage import FEDERATED_METRICS

    name = metric.split("/")[-1]
    return "acc" in name or name in FEDERATED_METRICS


def display_value(metric: str, value: float) -> float:
    return 100.0 * value if is_percent(metric) else value


@dataclass
class Row:
    """One configuration of the table."""

    label: str
    setting: str
    runs: list[dict[str, Any]]
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[Any]:
        return [run_seed(r) for r in self.runs]

    @property
    def name(self) -> str:
        return f"{self.label} {self.setting}".strip()


def run_seed(record: Mapping[str, Any]) -> Any:
    info = record.get("info") or {}
    return info.get("seed", record.get("seed"))


def run_label(record: Mapping[str, Any]) -> str:
    info = record.get("info") or {}
    if info.get("name"):
        return str(info["name"])
    path = record.get("config_path")
    return Path(path).stem if path else str(record.get("run_id") or Path(record.get("run_dir", "run")).name)


def source_config(record: Mapping[str, Any]) -> str | None:
    """The config file the run came from (the grid's source config, not its generated ``run.yaml``)."""
    info = record.get("info") or {}
    path = info["config"] if "config" in info else record.get("config_path")  # info may say "none" on purpose
    if isinstance(path, (list, tuple)):  # several --config files: the last one names the setup
        path = path[-1] if path else None
    return path


def configuration(record: Mapping[str, Any], seed_keys: Sequence[str], neutral: Iterable[str]) -> dict[str, Any]:
    """The settings of a run that define its configuration (see the module docstring)."""
    config = json.loads(json.dumps(record.get("config") or {"model": record.get("model_hparams")}, default=str))
    for key in seed_keys:
        delete_key(config, key)
    config.pop("config", None)
    return config_fingerprint(config, neutral)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config; a list of dicts (callbacks) by position, ``trainer.callbacks.0.init_args.x``,
    so that a row is named by the argument that differs, not by the whole list."""
    if isinstance(config, list) and config and all(isinstance(v, Mapping) for v in config):
        config = {str(i): v for i, v in enumerate(config)}
    if not isinstance(config, Mapping):
        return {prefix.rstrip("."): config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _under(key: str, combination: Iterable[str]) -> bool:
    """Whether the flat ``key`` is (inside) a ``--set`` key of ``combination``; list positions in ``key`` are passed
    over (``--set trainer.callbacks.init_args.x`` reaches ``trainer.callbacks.<last>.init_args.x``)."""
    plain = ".".join(p for p in key.split(".") if not p.isdigit())
    return any(k == c or k.startswith(f"{c}.") for k in (key, plain) for c in combination)


def group_runs(records: Sequence[Mapping[str, Any]], seed_keys: Sequence[str] = DEFAULT_SEED_KEYS,
               neutral: Iterable[str] | None = None) -> list[Row]:
    """Group run records into configuration rows (order of first appearance)."""
    neutral = GRID_NEUTRAL if neutral is None else neutral
    groups: dict[str, Row] = {}
    flats: dict[str, dict[str, Any]] = {}
    for record in records:
        config = configuration(record, seed_keys, neutral)
        key = run_label(record) + json.dumps(config, sort_keys=True, default=str)
        if key not in groups:
            groups[key] = Row(run_label(record), "", [])
            flats[key] = _flatten(config)
        groups[key].runs.append(dict(record))
    by_label: dict[str, list[str]] = {}
    for key, row in groups.items():
        by_label.setdefault(row.label, []).append(key)
    for keys in by_label.values():
        if len(keys) < 2:
            continue
        varying = sorted({k for a in keys for b in keys for k in set(flats[a]) | set(flats[b])
                          if flats[a].get(k) != flats[b].get(k)})
        names = short_names(varying)
        for key in keys:
            row = groups[key]
            combination = (row.runs[0].get("info") or {}).get("combination")
            if combination:
                grid_names = short_names(list(combination))
                # keys that differ besides the --set keys (two grids of one config name, other fit arguments)
                other = [k for k in varying if not _under(k, combination)][:4]
                row.setting = ",".join([*(f"{grid_names[k]}={v}" for k, v in combination.items()),
                                        *(f"{names[k]}={flats[key].get(k)}" for k in other)])
            else:
                row.setting = ",".join(f"{names[k]}={flats[key].get(k)}" for k in varying[:4])
    return list(groups.values())


def run_value(record: Mapping[str, Any], metric: str) -> float | None:
    """``metric`` of one run record in display units (accuracies in percent); ``None`` when the run lacks it."""
    value = (record.get("metrics") or {}).get(metric)
    return None if value is None else display_value(metric, float(value))


def row_values(row: Row, metric: str) -> list[float]:
    """``metric`` of every run of ``row`` that has it, in display units, in the order of the runs."""
    return [v for v in (run_value(r, metric) for r in row.runs) if v is not None]


def summarize(rows: Sequence[Row], metrics: Sequence[str], ddof: int = 1) -> list[Row]:
    """Fill ``stats`` (mean, std in display units; std is NaN for a single run) and ``paper`` of every row."""
    for row in rows:
        for metric in metrics:
            values = row_values(row, metric)
            row.counts[metric] = len(values)
            if values:
                array = np.asarray(values, dtype=np.float64)
                std = float(array.std(ddof=ddof)) if len(values) > ddof else math.nan
                row.stats[metric] = (float(array.mean()), std)
        papers = [paper_numbers(source_config(r)) for r in row.runs]
        row.paper = next((p for p in papers if p), {})
    return list(rows)


def default_metrics(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """``test/acc``, ``best/val/acc`` and ``last/val/acc`` where the runs have them (else every flat metric)."""
    present = {k for r in records for k in (r.get("metrics") or {})}
    preferred = [m for m in ("test/acc", "best/val/acc", "last/val/acc") if m in present]
    return preferred or sorted(k for k in present if not k.endswith("/epoch"))


def curves(row: Row, metric: str, ddof: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(epochs, mean, std)`` of ``metric`` over the row's runs per epoch (display units; the std with ``ddof``
    over the runs that reached that epoch, 0 where no more than ``ddof`` did)."""
    per_epoch: dict[int, list[float]] = {}
    for run in row.runs:
        history = run.get("history")  # a list of epoch rows, a callable returning one (W&B), or None (files)
        if callable(history):
            history = history()
        if history is None and run.get("run_dir"):
            path = Path(run["run_dir"]) / "metrics.csv"
            history = read_metrics_csv(path) if path.is_file() else []
        for entry in history or []:
            if entry.get(metric) is not None and entry.get("epoch") is not None:
                per_epoch.setdefault(int(entry["epoch"]), []).append(display_value(metric, float(entry[metric])))
    if not per_epoch:
        return None
    epochs = np.array(sorted(per_epoch))
    mean = np.array([np.mean(per_epoch[e]) for e in epochs])
    std = np.array([np.std(per_epoch[e], ddof=ddof) if len(per_epoch[e]) > ddof else 0.0 for e in epochs])
    return epochs, mean, std
