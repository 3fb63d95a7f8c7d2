"""PredictionWriter: ``lightning-methods predict`` writes its predictions to a file in the run directory.

One row per sample of the predict set, sorted by ``index``: ``index``, ``target`` (when the batches carry it), ``pred``,
``confidence``, and optionally ``prob_0 ... prob_{C-1}``, plus any other per-sample scalar that ``predict_step``
returns. Under DDP every rank predicts a shard; at the end of the epoch the rows of all ranks are gathered and
deduplicated by ``index`` (:func:`lightning_methods.utils.gather_by_index`), so padding duplicates of a
``DistributedSampler`` never appear and the file has exactly one row per sample. Rank zero writes the file atomically
(never under ``fast_dev_run``), with ``predictions.json`` beside it (checkpoint, rows, dataset size, accuracy when
targets are known), and prints where. In the directory of a fit (it holds the fit's ``results.json``) the files of a
checkpoint are named after it (``predictions-last.csv``, ``predictions-best-011.json``; see
:func:`lightning_methods.callbacks.results_writer.checkpoint_tag`), so predictions of two checkpoints never overwrite
each other.

Works with any ``predict_step`` that returns a dict of per-sample tensors with an ``"index"`` entry
(``ImageClassifier.predict_step`` returns ``index``, ``target``, ``pred``, ``confidence``, ``probs``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_methods.callbacks.results_writer import checkpoint_tag
from lightning_methods.results.record import read_record, run_directory
from lightning_methods.utils import atomic_write_json, atomic_write_text, gather_columns
from lightning_methods.utils.io import _atomic_write

FIRST_COLUMNS = ("index", "target", "pred", "confidence")


class PredictionWriter(BasePredictionWriter):
    """Write the gathered predictions of every predict dataloader (see the module docstring).

    Args:
        dirpath: where to write; default: the run directory (:func:`lightning_methods.results.record.run_directory`).
        filename: file name; ``.csv`` (default) or ``.npz`` (arrays under the column names, ``probs`` as one
            N x C array). With several predict dataloaders, ``_<dataloader index>`` is added before the suffix.
        probabilities: also write the class probabilities (``probs`` of ``predict_step``).

    Raises:
        ValueError: an unsupported file suffix.
        KeyError: a ``predict_step`` output without ``"index"`` (rows could not be deduplicated across ranks).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "predictions.csv",
                 probabilities: bool = False) -> None:
        super().__init__(write_interval="epoch")
        if Path(filename).suffix not in (".csv", ".npz"):
            raise ValueError(f"PredictionWriter filename must end in .csv or .npz, got {filename!r}")
        self.dirpath, self.filename, self.probabilities = dirpath, filename, probabilities
        self.written: list[Path] = []

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if trainer.fast_dev_run:
            return  # a smoke test: like checkpoints, no result files
        per_loader = predictions if predictions and isinstance(predictions[0], list) else [predictions]
        out_dir = Path(self.dirpath) if self.dirpath else run_directory(trainer)
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        summary: dict[str, Any] = {"checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None, "files": []}
        self.written = []
        stem = self._stem(out_dir, trainer.ckpt_path) if trainer.is_global_zero else ""
        for idx, batches in enumerate(per_loader):
            columns = self.gather(batches, pl_module.device)
            if not trainer.is_global_zero:
                continue
            path = out_dir / self._name(idx, len(per_loader), stem)
            self._save(path, columns)
            self.written.append(path)
            dataset = getattr(loaders[idx], "dataset", None) if idx < len(loaders) else None
            entry = {"path": str(path), "rows": int(len(columns["index"])),
                     "dataset_size": len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None}
            if "target" in columns and "pred" in columns:
                entry["accuracy"] = float((columns["target"] == columns["pred"]).double().mean())
            summary["files"].append(entry)
        if trainer.is_global_zero:
            atomic_write_json(out_dir / (stem + ".json"), summary)
            print(f"[lightning-methods] predictions: {', '.join(map(str, self.written))}", flush=True)

    def _stem(self, out_dir: Path, ckpt_path: Any) -> str:
        """The file stem: ``filename``'s, with ``-<checkpoint tag>`` in a fit's run directory."""
        stem = Path(self.filename).stem
        record = read_record(out_dir / "results.json") if (out_dir / "results.json").is_file() else None
        if ckpt_path and record is not None and record.get("command") == "fit":
            stem += f"-{checkpoint_tag(ckpt_path, out_dir)}"
        return stem

    def gather(self, batches: Sequence[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
        """Concatenate one dataloader's batch outputs, gather them from every rank and keep one row per index
        (sorted); every rank gets the same CPU tensors, also a rank without a batch
        (:func:`~lightning_methods.utils.gather_columns`). Collective under DDP: every rank must call it."""
        if not batches:
            return gather_columns(None, device, "the predict dataloader")
        if not isinstance(batches[0], dict) or "index" not in batches[0]:
            raise KeyError("PredictionWriter needs predict_step to return a dict with an 'index' entry (the position "
                           "of each sample), so rows of all ranks can be deduplicated; got "
                           f"{type(batches[0]).__name__} {sorted(batches[0]) if isinstance(batches[0], dict) else ''}")
        keys = ["index"] + [k for k, v in batches[0].items() if k != "index" and self._is_column(k, v, batches[0])]
        return gather_columns({k: torch.cat([b[k] for b in batches]).to(device) for k in keys}, device,
                              "the predict dataloader")

    def _is_column(self, key: str, value: Any, batch: dict[str, Any]) -> bool:
        """Per-sample scalars, and ``probs`` when ``probabilities`` is on."""
        if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != batch["index"].shape[0]:
            return False
        return value.ndim == 1 or (key == "probs" and self.probabilities and value.ndim == 2)

    def _name(self, idx: int, count: int, stem: str | None = None) -> str:
        path = Path(self.filename)
        stem = stem or path.stem
        return f"{stem}{path.suffix}" if count == 1 else f"{stem}_{idx}{path.suffix}"

    def _save(self, path: Path, columns: dict[str, torch.Tensor]) -> None:
        if path.suffix == ".npz":
            arrays = {k: v.numpy() for k, v in columns.items()}
            _atomic_write(path, lambda f: np.savez(f, **arrays))
            return
        atomic_write_text(path, predictions_csv_text(columns))


def predictions_csv_text(columns: dict[str, torch.Tensor]) -> str:
    """CSV text of prediction columns (1-D tensors; a 2-D ``probs`` becomes ``prob_0 ... prob_{C-1}``); floats
    with 9 significant digits, which round-trip float32 exactly."""
    names = [k for k in FIRST_COLUMNS if k in columns] + [k for k in columns if k not in FIRST_COLUMNS
                                                           and k != "probs"]
    arrays = [columns[k].numpy() for k in names]
    header = list(names)
    if "probs" in columns:
        probs = columns["probs"].numpy()
        arrays += [probs[:, c] for c in range(probs.shape[1])]
        header += [f"prob_{c}" for c in range(probs.shape[1])]
    formats = ["%d" if np.issubdtype(a.dtype, np.integer) or a.dtype == bool else "%.9g" for a in arrays]
    buf = io.StringIO()
    table = np.column_stack([a.astype(np.float64) for a in arrays])
    np.savetxt(buf, table, fmt=formats, delimiter=",", header=",".join(header), comments="")
    return buf.getvalue()
