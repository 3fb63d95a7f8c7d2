"""Plots of the Tunnel Effect (Masarczyk et al., NeurIPS 2023, arXiv 2305.19753): probe accuracy and numerical rank
against the layer with the tunnel shaded (the paper's Fig. 1), and the layer x epoch picture of how the tunnel forms
(its Fig. 5/6). matplotlib (Agg backend, no display) is imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_methods.tunnel.report import TunnelReport


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the tunnel plots need matplotlib (a dependency of lightning-methods): pip install "
                          "matplotlib") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_report(report: TunnelReport, path: str | Path, title: str | None = None) -> Path:
    """Accuracy (ID, OOD) and rank vs layer, tunnel shaded from its start to the last layer; written to ``path``."""
    plt = _pyplot()
    layers = report.column("layer")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 4))
    ax.plot(layers, [100 * a for a in report.column("acc_id")], "o-", color="tab:blue", label="probe accuracy (ID)")
    ood = report.column("acc_ood")
    if any(a is not None for a in ood):
        ax.plot(layers, [None if a is None else 100 * a for a in ood], "s-", color="tab:green",
                label="probe accuracy (OOD)")
    ax.set_xlabel("layer")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_xticks(layers)
    rank_ax = ax.twinx()
    rank_ax.plot(layers, report.column("rank"), "--", color="tab:red", label="numerical rank")
    rank_ax.set_ylabel("numerical rank")
    start = report.summary.get("tunnel_start_layer")
    if start is not None:
        ax.axvspan(start - 0.5, layers[-1] + 0.5, color="0.85", zorder=0, label="tunnel")
    handles = ax.get_legend_handles_labels()
    extra = rank_ax.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="lower right", fontsize=8)
    ax.set_title(title or report.summary.get("title", "Tunnel Effect"), fontsize=9)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_formation(history: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Layer x epoch heatmaps of probe accuracy and rank of periodic probes, the tunnel start marked per epoch."""
    plt = _pyplot()
    reports = [TunnelReport.from_dict(h["report"]) for h in history]
    epochs = [h["epoch"] for h in history]
    acc = [[100 * a for a in r.column("acc_id")] for r in reports]
    rank = [r.column("rank") for r in reports]
    n_layers = len(reports[0].rows)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.5 * n_layers + 4), max(3.0, 0.35 * len(epochs) + 1.5)))
    for ax, values, label, cmap in ((axes[0], acc, "probe accuracy (%)", "viridis"),
                                    (axes[1], rank, "numerical rank", "magma")):
        im = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap,
                       extent=(0.5, n_layers + 0.5, -0.5, len(epochs) - 0.5))
        starts = [r.summary.get("tunnel_start_layer") for r in reports]
        ax.plot(starts, range(len(epochs)), "w|", markersize=12, markeredgewidth=2, label="tunnel start")
        ax.set_yticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_xlabel("layer")
        ax.set_ylabel("epoch")
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax)
    axes[0].legend(loc="upper left", fontsize=7)
    fig.suptitle(title or "How the tunnel forms during training", fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
