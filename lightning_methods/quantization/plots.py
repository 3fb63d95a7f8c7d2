"""The per-bit-width test accuracy of a multi-bit model as files a person reads: ``bit_accuracy.json`` and
``bit_accuracy.png`` in the run directory, and the picture in W&B when a W&B logger is configured."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_methods.utils.io import atomic_write_json


def write_bit_accuracy(trainer: Any, accuracy: Mapping[int, float], stage: str = "test") -> Path:
    """Write ``{bits: accuracy}`` of one evaluation (rank zero only) and return the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_methods.results.record import run_directory
    from lightning_methods.utils.wandb import log_pictures

    out = run_directory(trainer)
    out.mkdir(parents=True, exist_ok=True)
    bits = sorted(accuracy)
    atomic_write_json(out / f"bit_accuracy_{stage}.json", {"stage": stage, "bits": bits,
                                                            "accuracy": [float(accuracy[b]) for b in bits]})
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    labels = [str(b) for b in bits]
    ax.plot(labels, [100 * float(accuracy[b]) for b in bits], marker="o")
    ax.set_xlabel("bit-width")
    ax.set_ylabel(f"{stage} accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out / f"bit_accuracy_{stage}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    log_pictures({f"{stage}/bit_accuracy": png}, loggers=trainer.loggers, step=trainer.global_step)
    return png
