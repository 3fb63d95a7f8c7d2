"""Run management of `lightning-methods fit / test / predict` after issues 21 (items 4, 5, 6, W&B names, noise) and 22
(items 1, 2, 6): a resume keeps the run's identity and its learning-rate column, a finished run is not redone, an
evaluation writes beside the run that owns the checkpoint (one record per checkpoint), one fit per run directory, one
config per run directory, every documented logger works, SIGTERM is "interrupted", and the package's own noise is
gone from stderr."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

from lightning_methods.cli import build_cli, main
from lightning_methods.cli_runs import ResumeError
from lightning_methods.results.aggregate import run_label, source_config
from lightning_methods.results.record import read_metrics_csv
from lightning_methods.runs import ConfigMismatchError, RunLockedError

from helpers import interrupted_fit

REPO = Path(__file__).resolve().parents[2]
QUICK = str(REPO / "configs/quickstart.yaml")
SMALL = [
    "--config",
    QUICK,
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--test_after_fit=off",
    "--trainer.enable_model_summary=false",
]
PROJECT = Path("runs/quickstart/lightning-methods-quickstart")


def the_run() -> Path:
    (last,) = PROJECT.glob("*/checkpoints/last.ckpt")
    return last.parent.parent.resolve()


def record(run: Path, name: str = "results.json") -> dict:
    return json.loads((run / name).read_text())


def test_resume_keeps_identity_and_lr_then_finished_runs_and_evaluations(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    interrupted_fit(monkeypatch, [*SMALL, "--trainer.max_epochs=4"], at_epoch=2)
    run = the_run()
    first = record(run)
    assert first["status"] == "interrupted" and first["config_path"] == QUICK
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["logger"]["init_args"]["name"] == "quickstart-seed0"  # W&B run name: stem + seed
    assert not (run / ".fit.lock").exists()  # released on the interrupt

    # the printed resume command, exactly
    last = run / "checkpoints/last.ckpt"
    assert f"--config {run / 'config.yaml'} --ckpt_path {last}" in capsys.readouterr().out
    build_cli(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)])
    done = record(run)
    assert done["status"] == "finished" and done["epochs_completed"] == 4
    for key in ("config_path", "config_hash", "started"):  # the run's identity, as `table` groups and names it
        assert done[key] == first[key], key
    assert run_label(done) == "quickstart" and source_config(done) == QUICK  # the row name and its `# paper:` file
    # train/lr of every epoch, the epoch before the resume included: cosine over T_max 12 from 0.05. The CSV keeps 9
    # significant digits (<= 5e-9 relative); train/lr is logged as float32 (<= 2^-24 relative more)
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        expected = 0.05 * (1 + math.cos(math.pi * r["epoch"] / 12)) / 2
        assert r["lr"] == pytest.approx(expected, rel=5e-9, abs=0)
        assert r["train/lr"] == pytest.approx(expected, rel=2**-24 + 5e-9, abs=0)

    # `--ckpt_path last` on the finished run: nothing is trained or tested again, the record is untouched
    before = (run / "results.json").read_bytes()
    capsys.readouterr()
    assert build_cli(["fit", *SMALL, "--trainer.max_epochs=4", "--ckpt_path=last"]) is None
    out = capsys.readouterr().out
    assert f"run {run.name} has already finished" in out and "--trainer.max_epochs N" in out
    assert f"lightning-methods test --config {run / 'config.yaml'} --ckpt_path" in out
    assert (run / "results.json").read_bytes() == before

    # test / predict with the ORIGINAL config write beside the run, into its W&B run, and say where
    cli = build_cli(["test", *SMALL, f"--ckpt_path={last}"])
    assert cli.trainer.loggers[0].version == run.name  # the run's W&B id, no new run
    assert sorted(p.name for p in PROJECT.iterdir()) == [run.name]  # no new run directory
    test_record = record(run, "results_test-last.json")
    assert test_record["command"] == "test" and test_record["test"]["checkpoint"] == str(last)
    assert (run / "metrics_test-last.csv").is_file() and (run / "results.json").read_bytes() == before
    assert f"test results: {run / 'results_test-last.json'}" in capsys.readouterr().out
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    build_cli(["predict", *SMALL, "--ckpt_path=last"])  # `last` resolves to this run (its config, any max_epochs)
    assert f"--ckpt_path last: evaluating the last checkpoint of run {run.name}" in capsys.readouterr().out
    build_cli(["predict", *SMALL, f"--ckpt_path={best}"])
    assert (run / "predictions-last.csv").is_file() and (run / f"predictions-{best.stem}.csv").is_file()
    assert json.loads((run / f"predictions-{best.stem}.json").read_text())["checkpoint"] == str(best)

    # a copied config with ANOTHER checkpoint file never overwrites the run's records: one record per checkpoint
    copy, other = tmp_path / "copy", tmp_path / "elsewhere/last.ckpt"
    copy.mkdir()
    other.parent.mkdir()
    shutil.copy(run / "config.yaml", copy / "config.yaml")
    shutil.copy(best, other)
    shutil.copy(str(best) + ".sha256", str(other) + ".sha256")
    records = {p.name: p.read_bytes() for p in run.glob("results*.json")}
    build_cli(["test", "--config", str(copy / "config.yaml"), f"--ckpt_path={other}"])
    assert {p.name: p.read_bytes() for p in run.glob("results*.json") if p.name in records} == records
    (new,) = [p for p in run.glob("results_test-last-*.json")]  # the other file's own record, named by its path
    assert record(run, new.name)["test"]["checkpoint"] == str(other)


def test_a_run_of_an_earlier_version_resumes_when_the_settings_added_since_keep_their_defaults(tmp_path, monkeypatch,
                                                                                                capsys, one_thread):
    """An upgrade of the package (or Lightning) adds settings; a run recorded before them lacks them in its
    config.yaml. With their defaults it is the same experiment: `--ckpt_path last` finds and continues it; with
    another value it is not, and nothing is trained."""
    monkeypatch.chdir(tmp_path)
    interrupted_fit(monkeypatch, [*SMALL, "--trainer.max_epochs=3"], at_epoch=1)
    run = the_run()
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["model"]["init_args"]["label_smoothing"], config["trainer"]["deterministic"]  # not there yet
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = (run / "checkpoints/last.ckpt").read_bytes()
    with pytest.raises(ResumeError, match=r"differs in model\.init_args\.label_smoothing\)"):
        main(["fit", *SMALL, "--trainer.max_epochs=3", "--model.init_args.label_smoothing=0.1", "--ckpt_path=last"])
    assert (run / "checkpoints/last.ckpt").read_bytes() == before  # nothing trained
    cli = build_cli(["fit", *SMALL, "--trainer.max_epochs=3", "--ckpt_path=last"])
    assert cli.trainer.loggers[0].version == run.name and cli.trainer.global_step == 3 * 2
    assert record(run)["status"] == "finished" and sorted(p.name for p in PROJECT.iterdir()) == [run.name]


def test_a_second_fit_in_the_run_directory_stops_naming_the_other_process(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    main(["fit", *SMALL, "--trainer.max_epochs=1"])
    run = the_run()
    resume = [
        "fit",
        "--config",
        str(run / "config.yaml"),
        "--ckpt_path",
        str(run / "checkpoints/last.ckpt"),
        "--trainer.max_epochs=2",
    ]
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # another process holds the run directory with the package's own lock
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom lightning_methods.runs import RunLock\n"
            f"RunLock({str(run)!r}, '.fit.lock').acquire()\nprint('locked', flush=True)\n"
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid} on "):
            main(resume)
    finally:
        holder.kill()
        holder.wait()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".fit.lock"} == files
    # the holder is gone: its stale lock is replaced and the resume runs
    build_cli(resume)
    assert record(run)["epochs_completed"] == 2 and not (run / ".fit.lock").exists()


def test_a_run_directory_belongs_to_one_configuration(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    ident = "--trainer.logger.init_args.id=shared"
    main(["fit", *SMALL, "--trainer.max_epochs=1", ident])
    run = (PROJECT / "shared").resolve()
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    lr = "--model.init_args.optimizer.init_args.lr=0.5"
    with pytest.raises(ConfigMismatchError, match=r"differ in: model\.init_args\.optimizer\.init_args\.lr"):
        main(["fit", *SMALL, "--trainer.max_epochs=1", ident, lr])
    config = yaml.safe_load((run / "config.yaml").read_text())  # an old config.yaml edited and rerun
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.5
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigMismatchError, match=r"optimizer\.init_args\.lr.*nothing was written"):
        main(["fit", "--config", str(edited)])
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # nothing written, no last-v1.ckpt
    assert len([p for p in tmp_path.rglob("*run-*-shared") if p.is_dir()]) == 1  # no W&B run for a refused fit
    # a fixed run directory (no logger: default_root_dir) is refused the same way
    fixed = [
        "fit",
        *SMALL,
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path / 'fixed'}",
        "--trainer.max_epochs=1",
    ]
    main(fixed)
    with pytest.raises(ConfigMismatchError, match=r"differ in: model\.init_args\.optimizer\.init_args\.lr"):
        main([*fixed, lr])


def _ddp_fit(rank: int, world_size: int, workdir: str) -> list:
    """Three fits of the run ``shared`` under DDP (2 gloo ranks, torchrun-style): while another live process holds
    the run directory's lock, after it is gone, and with a changed setting. Returns each attempt's error per rank."""
    os.chdir(workdir)
    os.environ["WANDB_MODE"] = "offline"
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.logger.init_args.id=shared"]
    outcomes = []
    for extra in ([], [], ["--model.init_args.optimizer.init_args.lr=0.5"]):
        try:
            build_cli(["fit", *SMALL, "--trainer.max_epochs=1", *ddp, *extra])
            outcomes.append(None)
        except (RunLockedError, ConfigMismatchError) as err:
            outcomes.append((type(err).__name__, str(err)))
        if not outcomes[-1]:
            continue
        if rank == 0 and len(outcomes) == 1:  # the other process finished: its lock file goes away
            (Path(workdir) / PROJECT / "shared" / ".fit.lock").unlink()
        import torch.distributed as dist

        dist.barrier()
    cli = build_cli(["fit", *SMALL, "--trainer.max_epochs=1", *ddp[:2]])  # a new run: its id from rank zero
    return outcomes + [cli.trainer.loggers[0].version]


def test_the_fit_lock_and_the_config_check_under_ddp(tmp_path):
    """Rank zero takes the lock and checks the config; every rank stops with the same error (no rank is left waiting
    in a collective), and a fit that may run runs on both ranks and releases the lock."""
    import socket

    from helpers import run_ddp

    run = tmp_path / PROJECT / "shared"
    run.mkdir(parents=True)
    (run / ".fit.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive: this test
    locked, ran, changed, new_id = zip(*run_ddp(_ddp_fit, args=(str(tmp_path),)))
    assert [e[0] for e in locked] == ["RunLockedError"] * 2
    assert all(f"in use by process {os.getpid()} on " in e[1] for e in locked)
    assert ran == (None, None)
    assert record(run)["status"] == "finished" and not (run / ".fit.lock").exists()
    assert record(run)["device"]["world_size"] == 2
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [0]
    assert [e[0] for e in changed] == ["ConfigMismatchError"] * 2
    assert all("model.init_args.optimizer.init_args.lr" in e[1] for e in changed)
    assert not (run / ".fit.lock").exists() and not list(run.rglob("last-v1.ckpt"))
    # a new run without an id: rank zero's package-made id names the one new run directory, which both ranks used
    assert re.fullmatch(r"r[0-9a-f]{11}", new_id[0]) and new_id[1] is None
    assert sorted(p.name for p in run.parent.iterdir()) == sorted(["shared", new_id[0]])
    new_run = run.parent / new_id[0]
    assert record(new_run)["status"] == "finished" and record(new_run)["device"]["world_size"] == 2
    assert yaml.safe_load((new_run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["id"] == new_id[0]


LOGGERS = {
    "wandb": [],
    "csv": ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir=logs"],
    "tensorboard": [
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir=logs",
    ],
    "none": ["--trainer.logger=false", "--trainer.default_root_dir=plain"],
}


@pytest.mark.parametrize("kind", list(LOGGERS))
def test_every_documented_logger(kind, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    main(["fit", *SMALL, "--trainer.max_epochs=2", *LOGGERS[kind]])
    (last,) = Path(".").rglob("checkpoints/last.ckpt")
    run = last.parent.parent
    assert record(run)["status"] == "finished" and (run / "config.yaml").is_file()
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [0, 1]
    if kind == "csv":  # Lightning's per-step CSV log has its own folder; metrics.csv stays the run's epoch table
        steps = (run / "csv/metrics.csv").read_text().splitlines()
        assert "step" in steps[0] and len(steps) > 1 and (run / "csv/hparams.yaml").is_file()
    if kind == "tensorboard":  # tensorboard is in the dev extra: its event file holds the epoch metrics
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (events,) = run.glob("events.out.tfevents.*")
        scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
        assert {"train/loss_epoch", "val/acc", "epoch"} <= set(scalars), scalars


NOISE = ("args parameter is intended", "anonymous setting", "Tip:", "litlogger", "git root", "exists and is not empty")


def test_sigterm_is_interrupted_and_the_package_noise_is_gone(tmp_path, monkeypatch, capfd, one_thread):
    """The console script as a user runs it: a SIGTERM stops the fit as "interrupted" (exit code 143), the printed
    resume command finishes it, and neither stderr holds the warnings the package used to cause (the resume runs
    in-process, to keep the test short: same code, stderr captured at the file descriptor)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("lightning-methods")
    command = [str(script), "fit", *SMALL, "--trainer.max_epochs=200"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(f"{PROJECT}/*/metrics.csv")) and time.monotonic() < deadline:
        time.sleep(0.2)
    (early,) = [p.parent for p in tmp_path.glob(f"{PROJECT}/*/metrics.csv")]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunLockedError, match=f"in use by process {proc.pid} on "):  # a real second fit, same run
        main(["fit", "--config", str(early / "config.yaml"), "--ckpt_path", str(early / "checkpoints/last.ckpt")])
    # refused before its logger started: the running fit's W&B run is the only one with this id
    assert len([p for p in tmp_path.rglob(f"*run-*-{early.name}") if p.is_dir()]) == 1
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    (run,) = [p.parent for p in tmp_path.glob(f"{PROJECT}/*/metrics.csv")]
    rec = record(run)
    assert rec["status"] == "interrupted" and "SIGTERM" in rec["error"], rec.get("error")
    for text in NOISE:
        assert text not in err, text
    resume = f"--config {run / 'config.yaml'} --ckpt_path {run / 'checkpoints/last.ckpt'}"
    assert resume in out
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_cli(["fit", *resume.split(), f"--trainer.max_epochs={rec['epochs_completed'] + 1}"])
    assert record(run)["status"] == "finished" and record(run)["started"] == rec["started"]
    err = capfd.readouterr().err + "\n".join(str(w.message) for w in caught)
    for text in NOISE:
        assert text not in err, text


def test_check_run_config_allows_only_a_longer_resume_of_the_run_itself(tmp_path):
    from lightning_methods.cli_runs import check_run_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    saved = {"trainer": {"max_epochs": 2, "logger": {"init_args": {"id": "a"}}}, "model": {"lr": 0.1}}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    longer = {
        "trainer": {"max_epochs": 5, "logger": {"init_args": {"id": "b"}}},
        "model": {"lr": 0.1},
        "ckpt_path": "x",
    }
    check_run_config(run, longer, run / "checkpoints/last.ckpt")  # the run's own checkpoint: may train longer
    check_run_config(run, longer, tmp_path / "ckpt/last.ckpt", ckpt_dir=tmp_path / "ckpt")  # its explicit dirpath
    with pytest.raises(ConfigMismatchError, match=r"differ in: trainer\.max_epochs\. "):
        check_run_config(run, longer, None)  # a fresh start with other settings
    (tmp_path / "cwd").mkdir()  # without a logger the run directory is default_root_dir, often "."
    (tmp_path / "cwd/config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigMismatchError, match=rf"^{tmp_path / 'cwd'} holds a run .*default_root_dir"):
        check_run_config(Path(os.path.relpath(tmp_path / "cwd")), longer, None)
    with pytest.raises(ConfigMismatchError, match=r"differ in: trainer\.max_epochs\. "):
        check_run_config(run, longer, tmp_path / "elsewhere/last.ckpt")  # another run's checkpoint
    other_lr = {**longer, "model": {"lr": 0.2}}
    with pytest.raises(ConfigMismatchError, match=r"differ in: model\.lr\. "):
        check_run_config(run, other_lr, run / "checkpoints/last.ckpt")
    check_run_config(tmp_path / "new", other_lr, None)  # no run there yet: nothing to compare


def test_a_run_reached_through_a_symlink_is_the_same_run(tmp_path):
    """Cluster home directories are often symlinks: a resume whose --ckpt_path spells the run's own checkpoint through
    one may still train the run longer, and an evaluation of it still joins the run's W&B run."""
    from lightning_methods.cli_runs import check_run_config, evaluate_beside_run

    real = tmp_path / "real"
    run_dir = real / "project" / "r0123456789a"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 3}}))
    (tmp_path / "link").symlink_to(real)
    via_link = tmp_path / "link" / "project" / "r0123456789a" / "checkpoints" / "last.ckpt"
    longer = {"trainer": {"max_epochs": 5}}
    check_run_config(run_dir, longer, via_link)  # its own checkpoint: training it longer is allowed
    check_run_config(tmp_path / "link" / "project" / "r0123456789a", longer, run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigMismatchError, match="trainer.max_epochs"):  # another run's checkpoint: refused
        check_run_config(run_dir, longer, tmp_path / "elsewhere" / "checkpoints" / "last.ckpt")
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"save_dir": str(real), "project": "project"}}
    config = {"ckpt_path": str(via_link), "results": {"dirpath": None}, "trainer": {"logger": logger}}
    evaluate_beside_run(config, "test")
    assert config["trainer"]["logger"]["init_args"]["id"] == "r0123456789a"  # joins the run's W&B run
    assert Path(config["results"]["dirpath"]).resolve() == run_dir.resolve()
