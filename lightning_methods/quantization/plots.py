"""The per-bit-width test accuracy of a multi-bit model as files a person reads: ``bit_accuracy_test.json`` and
``bit_accuracy_test.png`` beside the run's record, and the picture in W&B when a W&B logger is configured."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_methods.utils.io import atomic_write_json


def write_bit_accuracy(trainer: Any, accuracy: Mapping[int, float], stage: str = "test") -> Path:
    """Write ``{bits: accuracy}`` of one evaluation (rank zero only) and return the PNG's path: beside the run's
    record, tagged as the record is (``bit_accuracy_test.json`` with ``results.json``; a later ``test`` of one of the
    run's checkpoints writes ``bit_accuracy_test-last.json`` with ``results_test-last.json``, never over the fit's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_methods.results.record import run_directory
    from lightning_methods.utils.wandb import log_pictures

    writer = next((c for c in trainer.callbacks if type(c).__name__ == "ResultsWriter"), None)
    record = writer.record_file(trainer) if writer is not None else run_directory(trainer) / "results.json"
    out, tag = record.parent, record.stem.partition("-")[2]
    name = f"bit_accuracy_{stage}" + (f"-{tag}" if tag else "")
    out.mkdir(parents=True, exist_ok=True)
    bits = sorted(accuracy)
    atomic_write_json(out / f"{name}.json", {"stage": stage, "bits": bits,
                                                            "accuracy": [float(accuracy[b]) for b in bits]})
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    labels = [str(b) for b in bits]
    ax.plot(labels, [100 * float(accuracy[b]) for b in bits], marker="o")
    ax.set_xlabel("bit-width")
    ax.set_ylabel(f"{stage} accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out / f"{name}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    log_pictures({f"{stage}/bit_accuracy": png}, loggers=trainer.loggers, step=trainer.global_step)
    return png
