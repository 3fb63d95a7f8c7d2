"""What users run: the INSTALLED console scripts and the README's commands, as subprocesses, on tiny data.

Every command runs the way a user runs it: the executable next to ``sys.executable`` (the venv's ``bin/``), in a
temporary working directory outside the repository, with ``WANDB_MODE=offline``. The assertions are the documented
contract: exit status 0 on success and non-zero with the package's message on failure (issue 21 item 1), usage lines
that name the command, and the files README.md, docs/results.md and docs/checkpoints.md promise, in the places they
promise them (the run directory ``runs/quickstart/lightning-methods-quickstart/<run id>/``; ``test`` / ``predict`` of a
run's checkpoint beside that run; a resume that keeps the run's identity: issue 21 items 4 and 5).

The costly quickstart chain (fit, test, predict, resume) runs once in a module fixture; the other tests are
independent of each other (``-x`` friendly).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from lightning_methods.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
QUICK = REPO / "configs" / "quickstart.yaml"
#: the quickstart shrunk: 2 epochs of 3 batches, small evaluation sets, no progress bar
TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2", "--trainer.limit_predict_batches", "2",
        "--trainer.enable_progress_bar", "false"]
RUNS = Path("runs") / "quickstart" / "lightning-methods-quickstart"  # README: where the quickstart's runs live

#: each test (and the quickstart fixture) runs several fresh interpreters: about a minute on an idle 2-core machine,
#: several on a loaded one; the limit only catches hangs
pytestmark = pytest.mark.timeout(1200)


def script(name: str) -> Path:
    """The installed console script ``name`` of this interpreter's environment."""
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install -e .)")
    return path


def run(args: list[str], cwd: Path, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the console script ``args[0]`` with ``args[1:]`` in ``cwd``; with ``ok`` assert exit status 0 (the message
    shows the end of its output otherwise). ``out`` on the result is stdout + stderr."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)  # the installed package, not the source tree on a path
    proc = subprocess.run([str(script(args[0])), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    proc.out = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0, f"{shlex.join(args)} exited with {proc.returncode}:\n{proc.out[-4000:]}"
    return proc


def parallel(commands: list[list[str]], cwd: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run independent commands two at a time (the suite's 2 cores; each process uses one thread), not checked."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: run(args, cwd, ok=False, timeout=timeout), commands))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working directory outside the repository (commands must not depend on being run in the source tree)."""
    path = tmp_path_factory.mktemp("user")
    assert REPO not in path.parents
    return path


# ----------------------------------------------------------------------------------------------- help and exit codes
def help_cases(missing: list[str]) -> list[tuple[list[str], str]]:
    """Every installed ``lightning-methods-<c> --help``, plus the ``lightning-methods <c> --help`` spelling once (the
    dispatcher runs the same module: every command's dispatcher help is checked in-process in
    tests/core/test_commands.py, as are ``fit --help`` and ``--help`` in test_cli.py)."""
    cases = [([f"lightning-methods-{name}", "--help"], f"usage: lightning-methods {name}")
             for name in COMMANDS if name not in missing]
    cases += [(["lightning-methods", name, "--help"], f"usage: lightning-methods {name}")
              for name in ("table",)]
    return cases


#: Runs installed console scripts (``argv[1:]``: JSON list of argument lists) one after the other in ONE fresh
#: interpreter, each as ``python SCRIPT ARGS`` would (``runpy`` on the script file, ``__main__``, its own sys.argv),
#: and prints one JSON object per script: exit code, stdout, stderr. A fresh interpreter per script would repeat the
#: imports of torch and Lightning 14 times; that every module imports on its own is test_layout.py's fresh-interpreter
#: test.
SCRIPT_RUNNER = """
import contextlib, io, json, runpy, sys
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = list(argv)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException as error:
            code, _ = 1, print(repr(error), file=sys.stderr)
    print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
"""


def test_every_command_help_exits_0_and_names_the_command(work):
    """Exit status 0, a usage line naming ``lightning-methods <c>`` and nothing on stderr, for every installed script
    file (:data:`SCRIPT_RUNNER`)."""
    missing = [name for name in COMMANDS if not (BIN / f"lightning-methods-{name}").is_file()]
    cases = help_cases(missing)
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)
    argvs = [[str(script(args[0])), *args[1:]] for args, _ in cases]
    proc = subprocess.run([sys.executable, "-c", SCRIPT_RUNNER, json.dumps(argvs)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(results) == len(cases), proc.stdout[-2000:] + proc.stderr[-2000:]
    bad = []
    for (args, expected), result in zip(cases, results):
        usage = next((line for line in result["stdout"].splitlines() if line.startswith("usage:")), "")
        if result["code"] != 0 or not usage.startswith(expected) or result["stderr"].strip():
            bad.append(f"{shlex.join(args)}: exit {result['code']}, usage line {usage!r}\n{result['stderr'][-800:]}")
    assert not bad, "\n".join(bad)
    if missing:  # pyproject.toml lists them (tests/core/test_commands.py): the environment predates them
        pytest.skip(f"console scripts not installed: {missing} (pip install -e . installs them); the rest passed")


def test_list_exits_0_with_whole_plain_descriptions_and_absolute_config_paths(work):
    proc = run(["lightning-methods-list", "--section", "configs"], work)  # DataModule texts: test_results_catalog
    out = proc.stdout
    assert proc.stderr.strip() == "" or "Traceback" not in proc.stderr  # nothing returned into stderr (issue 21 #1)
    assert "``" not in out and ":class:" not in out and ":meth:" not in out  # no reStructuredText markup
    paths = re.findall(r"^\s+(/\S+\.yaml)", out, flags=re.M)
    assert len(paths) > 100 and all(Path(p).is_file() for p in paths)  # pasteable from any folder
    assert str(QUICK) in paths
    # a description is whole: the quickstart's header sentence ends with its period, not cut at a column
    assert "Quickstart: a small CIFAR-style ResNet on scikit-learn's bundled 8x8 digits (upscaled to 32x32x3), " \
           "offline." in " ".join(out.split())


def test_fit_on_a_config_of_another_command_names_that_command(work):
    """One line naming the command instead of the parser's list of unknown keys (all three kinds: test_commands.py)."""
    config = REPO / "configs/federated/digits_demo.yaml"
    proc = run(["lightning-methods", "fit", "--config", str(config)], work, ok=False)
    assert proc.returncode != 0
    assert proc.out.strip().splitlines()[-1].endswith(f"run: lightning-methods fed --config {config}"), proc.out
    assert len(proc.out.strip().splitlines()) == 1


def test_the_docs_relative_config_paths_work_from_another_folder(work):
    """The README writes `--config configs/...`; typed in a folder without that file, the command takes the package's
    own config (one note naming both) instead of stopping (the other forms and a file of the user's own:
    test_cli.py)."""
    proc = run(["lightning-methods", "fit", "--config", "configs/quickstart.yaml", "--print_config"], work)
    assert f"configs/quickstart.yaml is not in {work}: using {QUICK} (the package's own)" in proc.stderr, proc.out
    assert "resnet8" in proc.stdout and "DigitsDataModule" in proc.stdout


# ----------------------------------------------------------------------------------------------- the quickstart chain
def _resume_command(out: str) -> tuple[Path, list[str]]:
    """``(cwd, argv)`` of the last ``resume it with: cd DIR && lightning-methods ...`` line printed by a fit."""
    lines = [line.split("resume it with: ", 1)[1] for line in out.splitlines() if "resume it with: " in line]
    assert lines, f"no resume command printed:\n{out[-3000:]}"
    cd, command = lines[-1].split(" && ", 1)
    assert cd.startswith("cd ")
    return Path(shlex.split(cd)[1]), shlex.split(command)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quickstart(work) -> dict:
    """``lightning-methods fit --config configs/quickstart.yaml`` (2 tiny epochs) as the README gives it, then ``test``
    and ``predict`` with the original config on the run's checkpoint, then the printed resume command as printed
    (the run has finished) and with ``--trainer.max_epochs 3`` (continue it). Returns the outputs and file states."""
    state: dict = {}
    fit = run(["lightning-methods", "fit", "--config", str(QUICK), *TINY], work)
    match = re.search(r"\[lightning-methods\] run (\S+) started: (\S+)", fit.out)
    assert match, fit.out[-3000:]
    run_dir = Path(match.group(2))
    state.update(fit=fit, run_id=match.group(1), run_dir=run_dir, resume=_resume_command(fit.out))
    state["fit_record"] = json.loads((run_dir / "results.json").read_text())
    state["fit_metrics"] = _rows(run_dir / "metrics.csv")
    state["runs_before_eval"] = sorted(p.name for p in (work / RUNS).iterdir())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    cwd, argv = state["resume"]
    with ThreadPoolExecutor(max_workers=1) as beside:  # the finished run's resume command starts no W&B run
        again = beside.submit(run, [*argv, "--trainer.enable_progress_bar", "false"], cwd, ok=False)
        # test and predict one after the other: both log into the run's own W&B run, one process at a time
        state["test"], state["predict"] = (
            run(["lightning-methods", sub, "--config", str(QUICK), "--ckpt_path", str(ckpt), *TINY], work, ok=False)
            for sub in ("test", "predict"))
        state["again"] = again.result()
    state["runs_after_eval"] = sorted(p.name for p in (work / RUNS).iterdir())
    state["record_after_again"] = json.loads((run_dir / "results.json").read_text())
    state["resumed"] = run([*argv, "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false"], cwd,
                           ok=False)
    state["runs_after_resume"] = sorted(p.name for p in (work / RUNS).iterdir())
    return state


def test_fit_exits_0_and_writes_the_documented_run_directory(quickstart, work):
    run_dir, record = quickstart["run_dir"], quickstart["fit_record"]
    assert run_dir == (work / RUNS / quickstart["run_id"]).resolve()  # README: runs/quickstart/<project>/<run id>/
    assert re.fullmatch(r"r[0-9a-f]{11}", quickstart["run_id"])  # the package's W&B id (docs/checkpoints.md)
    for name in ("config.yaml", "results.json", "metrics.csv", "checkpoints/last.ckpt", "checkpoints/last.ckpt.sha256"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("checkpoints/best-*.ckpt"))  # the best epoch by val/acc, kept separately
    assert list((work / "runs/quickstart/wandb").glob("offline-run-*/run-*.wandb"))  # the offline W&B run
    assert record["command"] == "fit" and record["status"] == "finished" and record["run_id"] == quickstart["run_id"]
    assert record["epochs_completed"] == 2 and record["config_path"] == str(QUICK)
    assert 0.0 <= record["metrics"]["test/acc"] <= 1.0  # test_after_fit: best ran
    assert [int(r["epoch"]) for r in quickstart["fit_metrics"]] == [0, 1]  # one row per epoch
    cwd, argv = quickstart["resume"]
    assert cwd == work and argv[:2] == ["lightning-methods", "fit"] and str(run_dir / "config.yaml") in argv


def test_test_of_a_run_checkpoint_writes_beside_that_run(quickstart):
    """Issue 21 item 4: ``test`` with the original config on a run's checkpoint records its results beside that run,
    one record per checkpoint (``results_test-last.json``, docs/results.md; the fit's ``results.json`` untouched),
    says where, and creates no new run directory."""
    proc, run_dir = quickstart["test"], quickstart["run_dir"]
    assert proc.returncode == 0, proc.out[-3000:]
    assert "test/acc" in proc.out
    assert quickstart["runs_after_eval"] == quickstart["runs_before_eval"], "test/predict made a new run directory"
    record = json.loads((run_dir / "results_test-last.json").read_text())
    assert str(run_dir / "results_test-last.json") in proc.out  # the printed path
    assert record["command"] == "test" and 0.0 <= record["metrics"]["test/acc"] <= 1.0
    assert json.loads((run_dir / "results.json").read_text())["command"] == "fit"


def test_predict_of_a_run_checkpoint_writes_predictions_beside_that_run(quickstart):
    proc, run_dir = quickstart["predict"], quickstart["run_dir"]
    assert proc.returncode == 0, proc.out[-3000:]
    assert quickstart["runs_after_eval"] == quickstart["runs_before_eval"], "test/predict made a new run directory"
    rows = _rows(run_dir / "predictions-last.csv")  # per checkpoint beside the fit (docs/results.md)
    assert len(rows) == 2 * 64  # limit_predict_batches x batch_size, one row per sample
    assert {"index", "target", "pred", "confidence"} <= set(rows[0])
    indices = [int(r["index"]) for r in rows]
    assert indices == sorted(set(indices))  # sorted by index, no duplicates
    assert all(0.0 <= float(r["confidence"]) <= 1.0 and 0 <= int(r["pred"]) < 10 for r in rows)
    assert json.loads((run_dir / "predictions-last.json").read_text())


def test_the_printed_resume_command_on_a_finished_run_changes_nothing(quickstart):
    """Issue 21 item 5: ``--ckpt_path last.ckpt`` of a finished run neither retrains nor re-tests nor rewrites its
    record; it says so and exits 0."""
    proc = quickstart["again"]
    assert proc.returncode == 0, proc.out[-3000:]
    assert quickstart["record_after_again"] == quickstart["fit_record"]


def test_resuming_keeps_the_run_identity(quickstart, work):
    """Issue 21 item 5: the printed resume command (plus ``--trainer.max_epochs 3``) continues the same run: same
    directory, id, ``config_path`` (the user's config, so ``table`` groups it with its siblings) and ``started``;
    ``metrics.csv`` gains epoch 2 and keeps epochs 0 and 1 as they were."""
    proc, run_dir, before = quickstart["resumed"], quickstart["run_dir"], quickstart["fit_record"]
    assert proc.returncode == 0, proc.out[-3000:]
    assert quickstart["runs_after_resume"] == quickstart["runs_before_eval"]  # no new run directory
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "finished" and record["epochs_completed"] == 3
    assert record["run_id"] == before["run_id"] and record["started"] == before["started"]
    assert record["config_path"] == before["config_path"] == str(QUICK)
    rows = _rows(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for old, new in zip(quickstart["fit_metrics"], rows[:2]):
        assert new == old  # train/lr of the epoch before the resume included


def test_probe_and_locality_on_the_quickstart_checkpoint(quickstart, work):
    """``lightning-methods-probe`` on the fit's best checkpoint writes the documented files into ``--output_dir``;
    ``lightning-methods-locality`` on the same CNN says first that it has no attention layers (issue 22: the model is
    checked before the dataset and ``--num_images``, here a missing dataset and an impossible probe-set size)."""
    ckpt = next(quickstart["run_dir"].glob("checkpoints/best-*.ckpt"))
    out = work / "probe"
    probe, locality = parallel([
        ["lightning-methods-probe", "--ckpt", str(ckpt), "--data", "DigitsDataModule", "--output_dir", str(out),
         "--wandb_mode", "disabled", "--device", "cpu", "--probe.max_train_samples", "300",
         "--probe.max_test_samples", "200", "--probe.pool_size", "2", "--probe.probe_max_iter", "100"],
        ["lightning-methods-locality", str(ckpt), "--out", str(work / "loc"), "--dataset", "cifar100",
         "--data_dir", str(work / "nothing"), "--num_images", "0"],
    ], work)
    assert probe.returncode == 0, probe.out[-3000:]
    table = json.loads((out / "tunnel.json").read_text())
    assert table and (out / "tunnel.csv").is_file() and (out / "tunnel.png").is_file()
    assert locality.returncode == 1
    assert "no attention layers" in locality.out.strip().splitlines()[-2], locality.out[-2000:]
    assert "cifar-100" not in locality.out.lower() and not (work / "loc" / "table.md").exists()


# ----------------------------------------------------------------------------------------------- results commands
def test_grid_then_table_on_two_seeds(work):
    grid_dir = work / "grid"
    proc = run(["lightning-methods-grid", "--config", str(QUICK), "--seeds", "0", "1", "--grid_dir", str(grid_dir),
                "--", *TINY, "--trainer.logger", "false", "--test_after_fit", "last"], work)
    assert "[grid] run 1 of 2" in proc.out and "[grid] run 2 of 2" in proc.out  # progress (issue 21)
    assert "left" in proc.out  # the estimated time left
    records = [json.loads(p.read_text()) for p in sorted(grid_dir.glob("quickstart/seed*/results.json"))]
    assert [r["seed"] for r in records] == [0, 1] and all(r["status"] == "finished" for r in records)
    table = run(["lightning-methods-table", str(grid_dir)], work)
    row = next(line for line in table.stdout.splitlines() if line.startswith("| `quickstart"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2"  # n: both seeds in one row
    accs = [100 * r["metrics"]["test/acc"] for r in records]
    mean, std = cells[2].split(" ± ")
    assert float(mean) == pytest.approx(np.mean(accs), abs=0.006)  # printed with 2 decimals
    assert float(std) == pytest.approx(np.std(accs, ddof=1), abs=0.006)
    for name in ("table.md", "table.csv", "curves.png"):
        assert (grid_dir / name).is_file(), name


# ----------------------------------------------------------------------------------------------- family commands
def test_prototypes_writes_unit_prototypes_and_refuses_bad_input_before_optimising(work):
    out = work / "protos" / "p.npy"
    run(["lightning-methods-prototypes", "--classes", "6", "--dims", "3", "--iterations", "300", "--out", str(out)],
        work)
    protos = np.load(out)
    assert protos.shape == (6, 3) and protos.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, atol=4 * np.finfo(np.float32).eps)
    info = json.loads(out.with_suffix(".json").read_text())
    cos = protos.astype(np.float64) @ protos.T.astype(np.float64)
    np.fill_diagonal(cos, -np.inf)
    assert info["max_cosine"] == pytest.approx(cos.max(), abs=1e-5) and cos.max() < 0.5  # separated (6 on S^2)
    bad = ((["--lr", "nan"], "finite"),  # inf and 0: in-process in tests/core/test_commands.py
           (["--out", str(out.with_suffix(".json") / "q.npy")], "cannot write"))  # a file as the folder
    procs = parallel([["lightning-methods-prototypes", "--classes", "6", "--dims", "3", "--iterations", "10_000_000",
                       *args] for args, _ in bad], work, timeout=60)  # each fails at once, not after the steps
    for (args, says), proc in zip(bad, procs):
        assert proc.returncode == 1 and says in proc.out and "Traceback" not in proc.out, (args, proc.out[-1500:])


def test_hpn_sweep_over_two_task_weights(work):
    out = work / "tsweep"
    run(["lightning-methods-hpn-sweep", "--config", str(REPO / "configs/hpn/digits_multitask.yaml"),
         "--task_weights", "0.25", "0.9", "--out", str(out), "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
         "--trainer.enable_progress_bar", "false"], work)
    rows = _rows(next(out.rglob("sweep.csv")))
    assert [float(r["task_weight"]) for r in rows] == [0.25, 0.9]
    assert all(0.0 <= float(r["test/acc"]) <= 1.0 and float(r["test/mae"]) >= 0.0 for r in rows)
    assert next(out.rglob("sweep.png")).is_file()
    # the config's W&B logger (save_dir runs/, offline): one run per t, and the sweep's picture in a run of its own
    assert len(list((work / "runs" / "wandb").glob("offline-run-*"))) == 3
    assert list((work / "runs" / "wandb").glob("offline-run-*/files/media/images/hpn/sweep_*.png"))


def test_select_runs_its_rounds_with_progress(work):
    """Two stages, each with its Trainer and (offline) W&B run: the progress lines, and Lightning's device lines once,
    no install tips and no W&B warning about Lightning's ``anonymous`` setting (lightning_methods.utils.quiet)."""
    run_dir = work / "select"
    proc = run(["lightning-methods-select", "--config", str(REPO / "configs/noisy_labels/digits_sym40.yaml"),
                "--run_dir", str(run_dir), "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1",
                "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
                "--selection.rounds", "1", "--selection.warm_up_epochs", "1",
                "--selection.on_threshold_not_reached", "final"], work)
    assert "[select] stage 1 of 2" in proc.out and "[select] stage 2 of 2" in proc.out, proc.out[-3000:]
    assert proc.out.count("GPU available") == 1 and "Tip:" not in proc.out and "anonymous" not in proc.out, proc.out
    assert len(list(work.glob("runs/early_cutting/wandb/offline-run-*"))) == 2  # one W&B run per stage (config)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] in ("done", "threshold_not_reached")
    assert (run_dir / "round0" / "stats.json").is_file()
