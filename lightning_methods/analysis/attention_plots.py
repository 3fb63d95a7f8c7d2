"""PNG pictures of attention locality (matplotlib's Agg canvas, no pyplot state, no display needed).

- :func:`plot_mad_heatmap`: layer x head heat map of the MAD, values written in the cells.
- :func:`plot_layer_curves`: MAD and normalized entropy against depth, one thin line per head plus the mean.
- :func:`plot_attention_maps`: for a few images, the image and the attention of the central query patch of every
  head of the chosen (early) layers, as maps over the patch grid.
- :func:`plot_condition_curves`: mean MAD against depth for several conditions (the locality table's picture).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path


def plot_mad_heatmap(mad: np.ndarray, path: str | Path, title: str = "Mean attention distance",
                     label: str = "MAD") -> Path:
    """Heat map of a (layers, heads) MAD table with the values in the cells."""
    mad = np.asarray(mad, dtype=float)
    layers, heads = mad.shape
    fig = _figure(1.2 + 0.9 * heads, 1.0 + 0.5 * layers)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mad, cmap="viridis", aspect="auto")
    for layer in range(layers):
        for head in range(heads):
            ax.text(head, layer, f"{mad[layer, head]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if mad[layer, head] < np.nanmean(mad) else "black")
    ax.set_xticks(range(heads), [f"H{h}" for h in range(heads)])
    ax.set_yticks(range(layers), [f"L{layer}" for layer in range(layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    return _save(fig, path)


def plot_layer_curves(mad: np.ndarray, entropy: np.ndarray, path: str | Path, mad_label: str = "MAD",
                      title: str = "") -> Path:
    """MAD and normalized entropy against layer: one thin line per head and the mean over heads."""
    fig = _figure(9, 3.5)
    for i, (values, label) in enumerate(((mad, mad_label), (entropy, "normalized entropy"))):
        values = np.asarray(values, dtype=float)
        ax = fig.add_subplot(1, 2, i + 1)
        x = np.arange(values.shape[0])
        for head in range(values.shape[1]):
            ax.plot(x, values[:, head], lw=0.8, alpha=0.6, marker=".", label=f"head {head}")
        ax.plot(x, values.mean(1), lw=2.2, color="black", label="mean")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_attention_maps(maps: np.ndarray, images: np.ndarray, grid: Sequence[int], path: str | Path,
                        layers: Sequence[int] = (0, 1), query: int | None = None) -> Path:
    """Attention of one query patch (default: the central one) for every head of ``layers``.

    Args:
        maps: patch-query attention rows (images, layers, heads, N, K); with K > N the leading prefix keys are
            not drawn.
        images: the uint8 images (images, C, H, W) shown in the first column.
        grid: the token grid (gh, gw).
        path: the PNG to write.
        layers: the layers to show (early layers by default).
        query: the query patch index (row-major); default the centre of the grid.
    """
    maps = np.asarray(maps, dtype=float)
    gh, gw = int(grid[0]), int(grid[1])
    n = gh * gw
    query = (gh // 2) * gw + gw // 2 if query is None else query
    layers = [layer for layer in layers if layer < maps.shape[1]]
    heads = maps.shape[2]
    cols = 1 + len(layers) * heads
    fig = _figure(1.4 * cols, 1.5 * len(maps))
    for row, (image, per_layer) in enumerate(zip(images, maps)):
        ax = fig.add_subplot(len(maps), cols, row * cols + 1)
        img = np.asarray(image).transpose(1, 2, 0)
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.add_patch(_query_box(query, gw, img.shape[0] / gh, img.shape[1] / gw))
        ax.set_axis_off()
        for j, (layer, head) in enumerate((layer, head) for layer in layers for head in range(heads)):
            ax = fig.add_subplot(len(maps), cols, row * cols + 2 + j)
            ax.imshow(per_layer[layer, head, query, -n:].reshape(gh, gw), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"L{layer} H{head}", fontsize=8)
    return _save(fig, path)


def _query_box(query: int, gw: int, ph: float, pw: float):
    from matplotlib.patches import Rectangle

    r, c = divmod(query, gw)
    return Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor="red", lw=1.2)


def plot_condition_curves(curves: Mapping[str, np.ndarray], path: str | Path, ylabel: str = "mean MAD over heads",
                          title: str = "") -> Path:
    """Mean-over-heads MAD against layer for several conditions (``{condition: (layers,) or (seeds, layers)}``;
    with seeds, the mean and a +-1 std band)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in curves.items():
        values = np.atleast_2d(np.asarray(values, dtype=float))
        x = np.arange(values.shape[1])
        mean = values.mean(0)
        ax.plot(x, mean, marker="o", label=name)
        if len(values) > 1:
            std = values.std(0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)
