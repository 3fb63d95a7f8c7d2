"""The throughput harness in its small CPU mode: every case of every section runs and yields a finite ratio against
its section's baseline (so the harness never rots). Speed itself is never asserted."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_mode_measures_every_case(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    throughput = _load("throughput")
    rows = throughput.run("small", verbose=False)
    sections = {r["section"] for r in rows}
    assert sections == set(throughput.SECTIONS)
    for section in sections:
        first = next(r for r in rows if r["section"] == section)
        assert first["ratio"] == 1.0
    assert all(math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0 for r in rows)
    names = {r["case"] for r in rows}
    assert {"ImageClassifier + Trainer", "gpu_resident", "bf16-mixed", "SAM-ON + ascent-pass saving", "KOALA++",
            "DKD + DeepKD (batched)", "DKD + DeepKD (sequential)"} <= names
    table = throughput.markdown(rows, "small")
    assert "| ratio |" in table and "Machine:" in table
