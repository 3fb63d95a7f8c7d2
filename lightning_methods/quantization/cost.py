"""Training-cost accounting of multi-bit training: samples forwarded per bit-width and wall time, per epoch and
cumulative, so the speed-up of EMQ's bit-wise coresets over Any-Precision's full-data training can be read off W&B
and off ``multibit_cost.json``.

Kinds of forward passes: ``train`` (a child's training forward, with backward), ``teacher`` (an extra no-grad forward
of a higher bit-width for recursive supervision on another child's batch), ``score`` (coreset scoring). BatchNorm
recalibration for evaluation is counted apart (``calib``), never in the training cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_methods.utils import atomic_write_json

KINDS = ("train", "teacher", "score")


class TrainingCost:
    """Per-epoch and cumulative counters (identical on every rank once reduced).

    Args:
        bits: the trained bit-widths (counters exist for these; other bit-widths are counted under their own key
            when they appear).
    """

    def __init__(self, bits: Sequence[int]) -> None:
        self.bits = sorted(set(bits), reverse=True)
        self.epoch: dict[str, dict[int, int]] = {k: {} for k in KINDS}
        self.epoch_time = {"train": 0.0, "score": 0.0}
        self.calib_samples = 0
        self.total_samples: dict[int, int] = {}
        self.total_time = 0.0
        self.history: list[dict[str, Any]] = []
        self._t0: float | None = None

    # ------------------------------------------------------------------------------------------ counting
    def add(self, kind: str, bits: int, n: int) -> None:
        """Count ``n`` samples forwarded at ``bits`` as ``kind`` (``train``, ``teacher`` or ``score``)."""
        if kind not in KINDS:
            raise ValueError(f"cost kind must be one of {KINDS}, got {kind!r}")
        self.epoch[kind][bits] = self.epoch[kind].get(bits, 0) + int(n)

    def add_time(self, kind: str, seconds: float) -> None:
        self.epoch_time[kind] += float(seconds)

    def start(self) -> None:
        """Start (or resume) the training-time clock."""
        self._t0 = time.perf_counter()

    def pause(self, device: torch.device | None = None) -> None:
        """Stop the clock (validation does not count); synchronizes a CUDA device once."""
        if self._t0 is None:
            return
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.epoch_time["train"] += time.perf_counter() - self._t0
        self._t0 = None

    # ------------------------------------------------------------------------------------------ epoch end
    def _keys(self) -> list[int]:
        extra = sorted({b for d in self.epoch.values() for b in d} - set(self.bits), reverse=True)
        return self.bits + extra

    def end_epoch(self, epoch: int, reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
                  ) -> dict[str, float]:
        """Close the epoch: reduce the sample counts over ranks (``reduce`` sums a list of tensors), add them to the
        totals, append a history record and return the metrics to log (``cost/...``)."""
        self.pause()
        keys = self._keys()
        counts = torch.tensor([[self.epoch[k].get(b, 0) for b in keys] for k in KINDS], dtype=torch.float64)
        if reduce is not None:
            counts = reduce([counts])[0]
        per_kind = {k: {b: int(counts[i, j]) for j, b in enumerate(keys)} for i, k in enumerate(KINDS)}
        seconds = self.epoch_time["train"] + self.epoch_time["score"]
        out: dict[str, float] = {"cost/epoch_time_s": seconds, "cost/train_time_s": self.epoch_time["train"],
                                 "cost/score_time_s": self.epoch_time["score"]}
        epoch_total = 0
        for b in keys:
            n_b = sum(per_kind[k][b] for k in KINDS)
            epoch_total += n_b
            self.total_samples[b] = self.total_samples.get(b, 0) + n_b
            out[f"cost/samples_bit{b}"] = float(n_b)
            out[f"cost/total_samples_bit{b}"] = float(self.total_samples[b])
        for k in KINDS:
            out[f"cost/{k}_samples"] = float(sum(per_kind[k].values()))
        self.total_time += seconds
        out.update({"cost/samples": float(epoch_total), "cost/total_samples": float(sum(self.total_samples.values())),
                    "cost/total_time_s": self.total_time})
        self.history.append({"epoch": epoch, **{k.removeprefix("cost/"): v for k, v in out.items()},
                             "samples_by_kind": {k: {str(b): n for b, n in v.items()} for k, v in per_kind.items()}})
        self.epoch = {k: {} for k in KINDS}
        self.epoch_time = {"train": 0.0, "score": 0.0}
        return out

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Totals and per-epoch history of the closed epochs."""
        return {"total_samples": {int(b): int(n) for b, n in self.total_samples.items()},
                "total_time": self.total_time, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_samples = {int(b): int(n) for b, n in state.get("total_samples", {}).items()}
        self.total_time = float(state.get("total_time", 0.0))
        self.history = list(state.get("history", []))

    def write_json(self, path: str | Path) -> Path:
        """Write the per-epoch history and the totals as readable JSON (atomically)."""
        return atomic_write_json(path, {"bits": self.bits, "total_samples": {str(b): n for b, n in
                                                                              self.total_samples.items()},
                                        "total_time_s": self.total_time, "epochs": self.history})
