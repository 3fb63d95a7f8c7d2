"""Federated results as files a person can read: round history (CSV/JSON), per-client table, accuracy plot, and the
comparison table of several runs.

Two accuracies are reported and always labelled: FedFree's **final-round** mean of the clients' local-test accuracies
(unweighted over clients, with the standard deviation over clients) and HtFLlib's **best-over-rounds**
sample-weighted mean (sum of correct / sum of test samples, with the std over clients of that round).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_methods.utils import atomic_write_json, atomic_write_text


def round_metrics(correct: Sequence[int], total: Sequence[int]) -> dict[str, float]:
    """Per-round accuracy summary from per-client (correct, total) counts."""
    acc = np.array([c / t if t else 0.0 for c, t in zip(correct, total)])
    return {"acc/mean": float(acc.mean()), "acc/std": float(acc.std()), "acc/min": float(acc.min()),
            "acc/max": float(acc.max()), "acc/weighted": float(sum(correct) / max(sum(total), 1))}


def summarize(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Final-round and best-over-rounds accuracies of one run (rounds without evaluation are skipped)."""
    evaluated = [h for h in history if "acc/mean" in h]
    if not evaluated:
        return {}
    final = evaluated[-1]
    best = max(evaluated, key=lambda h: h["acc/weighted"])
    return {"rounds": int(history[-1]["round"]), "final_mean": final["acc/mean"], "final_std": final["acc/std"],
            "final_weighted": final["acc/weighted"], "best_weighted": best["acc/weighted"],
            "best_std": best["acc/std"], "best_round": int(best["round"]),
            "best_mean": max(h["acc/mean"] for h in evaluated)}


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and not isinstance(row[k], (dict, list))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_run_results(out_dir: str | Path, name: str, history: Sequence[Mapping[str, Any]],
                      clients: Sequence[Mapping[str, Any]], source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``history.csv``, ``clients.csv``, ``results.json`` and ``accuracy.png`` into ``out_dir``.

    ``source`` (the config files and seed of the command) is kept in ``results.json`` so that ``lightning-methods
    table`` groups the runs over seeds and prints the paper's numbers named in the config; ``environment`` records
    where the numbers were computed (torch version and thread count, CPU, library versions: float results on the CPU
    depend on all of them)."""
    out_dir = Path(out_dir)
    summary = {"algorithm": name, **summarize(history)}
    atomic_write_text(out_dir / "history.csv", to_csv(history))
    atomic_write_text(out_dir / "clients.csv", to_csv(clients))
    atomic_write_json(out_dir / "results.json", {"summary": summary, "clients": list(clients),
                                                 "source": dict(source or {}), "environment": environment()})
    plot_history(out_dir / "accuracy.png", name, history)
    return summary


def environment() -> dict[str, Any]:
    """torch's version and intra-op thread count, the CPU, the GPU (if any) and the library versions."""
    import os

    import torch

    from lightning_methods.results.record import cpu_model, versions

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": versions()}


def plot_history(path: Path, name: str, history: Sequence[Mapping[str, Any]]) -> None:
    """Mean (with min-max band) and weighted client accuracy over rounds."""
    try:
        import matplotlib
    except ImportError:  # plots are optional (extra [federated]); the CSV / JSON files hold the same numbers
        warnings.warn(f"matplotlib is not installed: {path} is not drawn (pip install matplotlib)", stacklevel=2)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "acc/mean" in h]
    if not rows:
        return
    r = [h["round"] for h in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(r, [h["acc/mean"] for h in rows], label="mean over clients")
    ax.fill_between(r, [h["acc/min"] for h in rows], [h["acc/max"] for h in rows], alpha=0.2, label="min-max")
    ax.plot(r, [h["acc/weighted"] for h in rows], "--", label="sample-weighted (HtFLlib)")
    ax.set(xlabel="round", ylabel="local test accuracy", title=name)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def comparison_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table: final-round mean +- std (FedFree's metric) and best-over-rounds weighted mean +- std
    (HtFLlib's metric), in percent."""
    lines = ["| algorithm | rounds | final-round mean acc (FedFree) | best-over-rounds weighted acc (HtFLlib) |",
             "|---|---|---|---|"]
    for s in summaries:
        if "final_mean" not in s:
            lines.append(f"| {s.get('algorithm', '?')} | - | - | - |")
            continue
        lines.append(f"| {s['algorithm']} | {s['rounds']} | {100 * s['final_mean']:.2f} +- {100 * s['final_std']:.2f}"
                     f" | {100 * s['best_weighted']:.2f} +- {100 * s['best_std']:.2f} (round {s['best_round']}) |")
    return "\n".join(lines)


def load_summary(run_dir: str | Path) -> list[dict[str, Any]]:
    """The summaries stored under ``run_dir`` (one per algorithm subdirectory holding ``results.json``).

    Raises:
        FileNotFoundError: if no ``results.json`` is found.
    """
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("results.json")) + sorted(run_dir.glob("*/results.json"))
    if not files:
        raise FileNotFoundError(f"no results.json in {run_dir} or its subdirectories: is it a finished "
                                "lightning-methods-fed run directory?")
    return [json.loads(f.read_text())["summary"] for f in files]
