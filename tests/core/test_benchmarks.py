"""The benchmark harness: interleaving order, per-round ratio statistics on fake timers, the generated doc and the
environment record, worker shutdown, and the small CPU mode end to end (every case of every section yields a finite
ratio, so the harness never rots). Speed itself is never asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


#: case names each core section must measure (a renamed or dropped case is a broken benchmark)
EXPECTED_CASES = {"loop": {"ImageClassifier + Trainer"}, "input": {"gpu_resident"}, "precision": {"bf16-mixed"},
                  "optimizers": {"SAM-ON + ascent-pass saving", "KOALA++"},
                  "distillation": {"DKD + DeepKD (batched)", "DKD + DeepKD (sequential)"}}
#: the core sections run by default; the family sections and the GPU method cases train several models per case
#: (minutes in small mode on 2 cores) and run with ``-m slow``; ``imports`` starts fresh interpreters (tested below)
SMOKE = ("loop", "pipeline", "input", "precision", "optimizers", "distillation")


def _sections() -> list:
    throughput = _load("throughput")
    return [s if s in SMOKE else pytest.param(s, marks=pytest.mark.slow)
            for s in throughput.SECTIONS if s != "imports"]


@pytest.mark.parametrize("section", _sections())
def test_small_mode_measures_every_case(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    throughput = _load("throughput")
    rows = throughput.run("small", sections=(section,), verbose=False)
    assert rows and {r["section"] for r in rows} == {section}
    first = rows[0]
    assert first["ratio"] == first["ratio_p25"] == first["ratio_p75"] == 1.0 and first["rounds"] >= 1
    assert all(math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0 for r in rows)
    assert EXPECTED_CASES.get(section, set()) <= {r["case"] for r in rows}
    table = throughput.markdown(rows, "small")
    assert "| ratio (median) | 25th-75th pct | rounds |" in table and "Measured with:" in table


def test_rotation_puts_every_case_in_every_position_once():
    harness = _load("harness")
    orders = [harness.rotation(4, r) for r in range(4)]
    assert orders[0] == [0, 1, 2, 3] and orders[1] == [1, 2, 3, 0] and orders[3] == [3, 0, 1, 2]
    for position in range(4):
        assert sorted(order[position] for order in orders) == [0, 1, 2, 3]


def test_interleave_runs_warmup_then_rounds_in_rotating_order():
    harness = _load("harness")
    calls = []

    def case(i):
        def fn():
            calls.append(i)
            return float(len(calls))
        return fn

    times = harness.interleave([case(0), case(1), case(2)], rounds=3)
    assert calls == [0, 1, 2] + [0, 1, 2] + [1, 2, 0] + [2, 0, 1]
    assert [len(t) for t in times] == [3, 3, 3]
    assert times[0] == [4.0, 9.0, 11.0]  # the call number of case 0 in each round
    with pytest.raises(ValueError, match="rounds=0"):
        harness.interleave([case(0)], rounds=0)


def test_per_round_ratios_cancel_load_that_moves_whole_rounds():
    """A fake clock: the case costs 1.5x the baseline, and each round runs under a different load factor. Timing each
    case on its own (the old median of repeats) mixes the loads; the per-round ratio is exactly 1.5."""
    harness = _load("harness")
    load = [1.0, 5.0, 1.0, 7.0, 2.0]
    calls = []
    cost = {"base": 0.2, "case": 0.3}

    def timed(name):
        def fn():
            calls.append(name)
            return cost[name] * load[(len(calls) - 1) // 2]  # two cases per round, the round sets the load
        return fn

    times = harness.interleave([timed("base"), timed("case")], rounds=5, warmup=False)
    stats = harness.ratio_stats(times[1], times[0])
    assert stats["ratio"] == pytest.approx(1.5) and stats["ratio_p25"] == pytest.approx(1.5)
    assert stats["ratio_p75"] == pytest.approx(1.5) and stats["rounds"] == 5


def test_ratio_statistics_are_median_and_quartiles_of_per_round_ratios():
    harness = _load("harness")
    base, case = [1.0, 2.0, 4.0, 1.0, 2.0], [2.0, 4.0, 8.0, 3.0, 1.0]  # ratios 2, 2, 2, 3, 0.5
    stats = harness.ratio_stats(case, base)
    ratios = [c / b for c, b in zip(case, base)]
    assert stats["ratio"] == 2.0 and stats["rounds"] == 5 and stats["seconds"] == 3.0
    assert stats["ratio_p25"] == pytest.approx(float(np.percentile(ratios, 25)))
    assert stats["ratio_p75"] == pytest.approx(float(np.percentile(ratios, 75)))
    assert harness.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        harness.ratio_stats([1.0], [1.0, 2.0])


def test_environment_and_generated_doc_record_what_was_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    throughput = _load("throughput")
    env = throughput.environment()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["logical_cores"] >= 1 and env["cpu"]
    assert {"python", "torch", "lightning", "torchvision", "numpy"} <= set(env["versions"])
    env["load_average"] = [9.5, 8.0, 7.0]
    rows = [{"section": "optimizers", "case": "SGD (baseline)", "ms_per_step": 10.0, "img_per_s": 1600.0, "ratio": 1.0,
             "ratio_p25": 1.0, "ratio_p75": 1.0, "rounds": 5},
            {"section": "optimizers", "case": "SAM", "ms_per_step": 20.5, "img_per_s": 780.0, "ratio": 2.04,
             "ratio_p25": 1.98, "ratio_p75": 2.11, "rounds": 5},
            {"section": "optimizers", "case": "a server step", "ms_per_step": 3.0, "img_per_s": None, "ratio": 0.3,
             "ratio_p25": 0.3, "ratio_p75": 0.3, "rounds": 5}]  # a unit without images (items 0)
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu_quick.json").write_text(json.dumps({"mode": "quick", "environment": env, "rows": rows}))
    text = throughput.write_docs(tmp_path / "benchmarks.md", results)
    assert (tmp_path / "benchmarks.md").read_text() == text
    assert "| optimizers | SAM | 2.040 | 1.980-2.110 | 5 | 20.50 | 780 |" in text
    assert "| optimizers | a server step | 0.300 | 0.300-0.300 | 5 | 3.00 | - |" in text
    assert "OMP_WAIT_POLICY=PASSIVE" in text and "load average 9.5 / 8.0 / 7.0" in text
    assert "under load" in text and "GPU: not measured" in text and "Do not edit by hand" in text
    assert "Cut short" not in text
    cut = {"mode": "gpu", "environment": env, "rows": rows, "complete": False, "sections_measured": ["optimizers"]}
    (results / "gpu.json").write_text(json.dumps(cut))
    assert "**Cut short**: only the sections optimizers were measured" in throughput.write_docs(tmp_path / "b.md",
                                                                                                results)
    with pytest.raises(FileNotFoundError, match="no benchmark records"):
        throughput.write_docs(tmp_path / "x.md", tmp_path / "empty")


def test_the_record_is_rewritten_after_each_section_so_a_cut_keeps_the_finished_ones(tmp_path, monkeypatch):
    """``throughput.py --json``: a run stopped during its second section (a time limit of the GPU check) leaves a
    record of the first one, marked incomplete; a whole run is marked complete."""
    throughput = _load("throughput")

    def fake_run(mode, sections, with_compile=None, verbose=True, rounds=None):
        if sections == ("input",):
            raise KeyboardInterrupt  # what a time limit's signal does to the run
        return [{"section": sections[0], "case": "baseline", "ms_per_step": 1.0, "img_per_s": 1.0, "ratio": 1.0,
                 "ratio_p25": 1.0, "ratio_p75": 1.0, "rounds": 1}]

    monkeypatch.setattr(throughput, "run", fake_run)
    out = tmp_path / "gpu.json"
    with pytest.raises(KeyboardInterrupt):
        throughput.main(["--mode", "small", "--sections", "loop,input", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["complete"] is False and record["sections_measured"] == ["loop"]
    assert [r["section"] for r in record["rows"]] == ["loop"]
    throughput.main(["--mode", "small", "--sections", "loop,precision", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["complete"] is True and [r["section"] for r in record["rows"]] == ["loop", "precision"]


def test_cpu_mode_is_read_from_the_command_line_before_torch_loads():
    throughput = _load("throughput")
    assert throughput._cpu_mode(["--mode", "quick"]) and throughput._cpu_mode(["--mode=cpu", "--rounds", "3"])
    assert not throughput._cpu_mode(["--gpu"]) and not throughput._cpu_mode(["--mode", "full"])


def test_release_workers_shuts_down_persistent_workers():
    harness = _load("harness")
    loader = torch.utils.data.DataLoader(torch.arange(8.0), batch_size=4, num_workers=1, persistent_workers=True)
    assert len(list(loader)) == 2
    workers = list(loader._iterator._workers)
    harness.release_workers({"train": [loader]})
    assert loader._iterator is None and not any(w.is_alive() for w in workers)


def test_import_cases_time_fresh_interpreters(monkeypatch):
    throughput = _load("throughput")
    ran = []
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: ran.append(cmd))
    cases = throughput.import_cases(throughput.settings("small"))
    assert cases[0][0].endswith("(baseline)") and "import torch" in cases[0][0]
    for _name, fn, items in cases:
        assert fn() >= 0 and items == 1
    assert [cmd[-1] for cmd in ran] == ["import torch", "import lightning", "import lightning_methods.optim",
                                        "from lightning_methods.optim import SAMON"]


def test_imagenet_gpu_section_runs_its_three_cases(tmp_path):
    """The GPU section of ``benchmarks/imagenet_cases.py`` (recorded only on a GPU machine) runs end to end here with
    a small model (MobileNetV3-Small) on the CPU: a synthetic batch, the ``decode_on_device`` loader (decoded by
    threads of this process on a CPU) and the loader whose worker decodes; each row has a finite rate and the two fed
    rows a pipeline cost."""
    pytest.importorskip("litdata")
    cases = _load("imagenet_cases")
    from lightning_methods.imagenet.prepare import convert

    root = cases.write_photo_tree(tmp_path / "tree", 8)
    convert(root, str(tmp_path / "conv"), num_workers=1, verify=False)
    rows = cases.gpu_section(str(tmp_path / "conv"), root, batch=2, workers=1, steps=1, warmup=1, device="cpu",
                             arch="mobilenet_v3_small")
    assert [r["case"].split(", ")[-1] for r in rows] == [
        "synthetic batch on the device", "fed by streaming + nvJPEG decode (decode_on_device=True)",
        "fed by streaming + decode in 1 workers (decode_on_device=False)"]
    assert all(math.isfinite(r["steps_per_s"]) and r["steps_per_s"] > 0 for r in rows)
    synth = rows[0]["steps_per_s"]
    for r in rows[1:]:  # rates are rounded to 0.01, costs to 0.001: the cost recomputed from the rounded rates
        fed = r["steps_per_s"]
        slack = 0.0005 + 0.005 / synth + 0.005 * fed / synth**2
        assert r["pipeline_cost"] == pytest.approx(1 - fed / synth, abs=slack) and r["pipeline_cost"] < 1


def _gpu_check(out: Path, smoke: bool, tmp_path: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SMOKE": "1" if smoke else "0",
           "GPU_CHECK_WHEELS": str(tmp_path / "no_wheels"), "TMPDIR": str(tmp_path), **env_vars}
    for name in ("GPU_CHECK_STEPS", "GPU_CHECK_BUDGET"):
        if name not in env_vars:
            env.pop(name, None)
    return subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out)], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=280)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the whole check")
def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    result = _gpu_check(tmp_path / "out", smoke=False, tmp_path=tmp_path)
    assert result.returncode == 2
    assert "no CUDA device here" in result.stdout
    assert "no CUDA device here" in (tmp_path / "out" / "summary.txt").read_text()


#: gpu_check.sh's steps (GPU_CHECK_STEPS names): their summary lines in smoke mode and the files they leave in OUT
GPU_CHECK_STEPS = {
    "pytest": (["pytest -m gpu"], ["pytest_gpu.log"]),
    "imagenet": (["imagenet_cases.py --images 64 --rounds 1 --batch 16"], ["imagenet_gpu.json", "imagenet_gpu.log"]),
    "runs": (["demo", "config imagenet_resnet50_samon"], ["runs.log", "runs_results.json"]),
    "throughput": (["throughput.py --mode small --sections loop"], ["gpu.json", "throughput.log"]),
}


@pytest.mark.slow  # about 25 s (runs) and 45 s (all): run them before a GPU session, `pytest -m slow -k gpu_check`
@pytest.mark.parametrize("steps", ["runs", " ".join(GPU_CHECK_STEPS)])
def test_gpu_check_runs_its_steps_in_smoke_mode(tmp_path, steps):
    """``benchmarks/gpu_check.sh``, the prepared GPU check, with ``GPU_CHECK_SMOKE=1`` on this CPU: the steps run
    (tiny sizes) and leave the files that the device tool brings back - at most 8, named in letters, digits, '.',
    '_' and '-' - so the script stays in step with the tests, benchmarks and CLI it calls: the step that drives the
    CLI (its real runs), then every step (nine fresh interpreters). The budget, the step choice and the refusals are
    checked by the fast tests around this one."""
    out = tmp_path / "out"
    result = _gpu_check(out, smoke=True, tmp_path=tmp_path, GPU_CHECK_STEPS=steps)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text()
    chosen = steps.split()
    lines = [line for line in summary.splitlines() if ": exit " in line]
    assert [line.split(":")[0] for line in lines] == [n for s in chosen for n in GPU_CHECK_STEPS[s][0]], summary
    assert all(": exit 0 in " in line for line in lines), summary
    assert "\nnot done (skipped or timed out): none\n" in summary, summary
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.txt", *(f for s in chosen for f in GPU_CHECK_STEPS[s][1])])
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    if "runs" in chosen:
        runs = json.loads((out / "runs_results.json").read_text())
        assert set(runs) == {"demo_photos_fit", "imagenet_resnet50_samon"}
        assert all(run["status"] == "finished" and 0 <= run["test"]["test/acc"] <= 1 for run in runs.values())
        assert not list(tmp_path.glob("tmp.*")), "the scratch folder of the runs is removed"
    if "imagenet" in chosen:
        pipeline = json.loads((out / "imagenet_gpu.json").read_text())
        assert pipeline["complete"] is True  # no --gpu in smoke mode: the CPU section is all that was asked
        assert {row["case"] for row in pipeline["cpu"]} >= {
            "ImageFolder + PIL transforms (workers)", "streaming + batched uint8 pipeline"}
    if "throughput" in chosen:
        throughput = json.loads((out / "gpu.json").read_text())
        assert throughput["mode"] == "small" and {row["section"] for row in throughput["rows"]} == {"loop"}
        assert throughput["complete"] is True and throughput["sections_measured"] == ["loop"]


def test_gpu_check_keeps_to_its_budget_and_names_the_steps_left_for_a_second_call(tmp_path):
    """A step that finds less than 15 s of ``GPU_CHECK_BUDGET`` left is skipped, not started; the summary's last
    step line names the skipped steps as the ``GPU_CHECK_STEPS`` of a second call; only the chosen steps run."""
    out = tmp_path / "out"
    result = _gpu_check(out, smoke=True, tmp_path=tmp_path, GPU_CHECK_STEPS="runs throughput", GPU_CHECK_BUDGET="0")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text()
    assert "steps: runs throughput | budget: 0 s" in summary
    skipped = [line.split(":")[0] for line in summary.splitlines() if ": skipped, " in line]
    assert skipped == ["demo", "config imagenet_resnet50_samon", "throughput.py --mode small --sections loop"]
    assert ": exit " not in summary and "pytest" not in summary and "imagenet_cases" not in summary
    assert ('not done (skipped or timed out): runs throughput -> rerun: GPU_CHECK_STEPS="runs throughput" '
            "bash benchmarks/gpu_check.sh") in summary
    assert json.loads((out / "runs_results.json").read_text()) == {}
    assert sorted(p.name for p in out.iterdir()) == ["runs_results.json", "summary.txt"]


@pytest.mark.parametrize(("name", "value", "message"), [
    ("GPU_CHECK_STEPS", "pytest gpus", "GPU_CHECK_STEPS names 'gpus'; the steps are: pytest imagenet runs throughput"),
    ("GPU_CHECK_BUDGET", "5m", "GPU_CHECK_BUDGET='5m' is not a whole number of seconds")])
def test_gpu_check_refuses_a_bad_setting_before_any_step(tmp_path, name, value, message):
    result = _gpu_check(tmp_path / "out", smoke=True, tmp_path=tmp_path, **{name: value})
    assert result.returncode == 2 and message in result.stdout
    assert (tmp_path / "out" / "summary.txt").read_text().strip() == f"gpu_check: {message}"


def test_imagenet_whole_image_case_turns_region_decoding_off_and_back(monkeypatch):
    """The benchmark's whole-image case switches region decoding off for its epochs only, and restores the user's
    ``LIGHTNING_METHODS_TURBOJPEG`` (unset or a path) and the cached lookup afterwards."""
    from lightning_methods.datamodules import jpeg_region

    cases = _load("imagenet_cases")
    monkeypatch.delenv(jpeg_region.ENV, raising=False)
    jpeg_region.library.cache_clear()
    found = jpeg_region.library()
    seen = []
    loader = cases.WholeImageDecode([1, 2])
    for item in loader:
        seen.append((item, jpeg_region.library(), os.environ[jpeg_region.ENV]))
    assert seen == [(1, None, "off"), (2, None, "off")]
    name = getattr(jpeg_region.library(), "_name", None)  # found again after the block (a new handle on the file)
    assert jpeg_region.ENV not in os.environ and name == getattr(found, "_name", None)
    if found is not None:
        monkeypatch.setenv(jpeg_region.ENV, found._name)
        with cases.whole_image_decode():
            assert jpeg_region.library() is None
        assert os.environ[jpeg_region.ENV] == found._name and jpeg_region.library()._name == found._name
    jpeg_region.library.cache_clear()
