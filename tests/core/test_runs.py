"""lightning_methods.runs: fingerprints that name what differs, finished stages, the run lock, W&B stage settings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jsonargparse import Namespace

from lightning_methods.runs import (
    NEUTRAL_KEYS,
    ConfigMismatchError,
    RunLockedError,
    StagedRun,
    config_fingerprint,
    fingerprint_diff,
)


def cfg(**trainer) -> Namespace:
    return Namespace(trainer=Namespace(max_epochs=3, precision="32-true", enable_progress_bar=True, **trainer),
                     data=Namespace(class_path="X", init_args=Namespace(data_dir="/a", num_workers=4, seed=1)))


def test_fingerprint_keeps_results_settings_and_drops_neutral_ones():
    fp = config_fingerprint(cfg())
    assert fp == {"trainer": {"max_epochs": 3, "precision": "32-true"},
                  "data": {"class_path": "X", "init_args": {"seed": 1}}}
    assert {"data_dir", "num_workers", "logger", "enable_progress_bar"} <= NEUTRAL_KEYS
    other = config_fingerprint(cfg(devices=2))
    other["data"]["init_args"]["seed"] = 2
    assert fingerprint_diff(fp, other) == ["data.init_args.seed", "trainer.devices"]
    assert fingerprint_diff(fp, config_fingerprint(cfg())) == []
    # the node count sets the world size, and with it the global batch: another experiment, like another
    # device count; a run recorded before num_nodes was kept resumes on one node (Trainer's default)
    assert "num_nodes" not in NEUTRAL_KEYS
    assert fingerprint_diff(fp, config_fingerprint(cfg(num_nodes=2))) == ["trainer.num_nodes"]
    assert fingerprint_diff(fp, config_fingerprint(cfg(num_nodes=1))) == []


def test_settings_a_later_version_added_with_their_defaults_are_no_difference(tmp_path):
    """A run recorded before a setting existed resumes when the setting holds its default (the parameter's default in
    the signature of the class named beside it, through ``**kwargs`` into the base class; Lightning's Trainer for a
    ``trainer`` section); another value, a removed setting or an unknown class is a difference."""
    old = {"config": {"model": {"class_path": "lightning_methods.quantization.MultiBitClassifier",
                                "init_args": {"bits": [1, 32]}}, "trainer": {"max_epochs": 3}}}
    new = json.loads(json.dumps(old))
    new["config"]["model"]["init_args"].update(quantizer="dorefa",  # MultiBitClassifier's own parameter
                                               label_smoothing=0.0)  # ImageClassifier's, through **kwargs
    new["config"]["trainer"]["deterministic"] = None  # Lightning's Trainer
    assert fingerprint_diff(old, new) == []
    assert fingerprint_diff(new, old) == ["config.model.init_args.label_smoothing", "config.model.init_args.quantizer",
                                          "config.trainer.deterministic"]  # settings gone: not the same code
    new["config"]["model"]["init_args"]["quantizer"] = "lsq"
    new["config"]["trainer"]["deterministic"] = True
    assert fingerprint_diff(old, new) == ["config.model.init_args.quantizer", "config.trainer.deterministic"]
    unknown = {"model": {"class_path": "not_a_module.Model", "init_args": {}}}
    assert fingerprint_diff(unknown, {"model": {"class_path": "not_a_module.Model", "init_args": {"width": 1}}}) == [
        "model.init_args.width"]
    StagedRun(tmp_path, "grid", old).open().close()
    new["config"]["model"]["init_args"]["quantizer"] = "dorefa"
    new["config"]["trainer"]["deterministic"] = None
    StagedRun(tmp_path, "grid", new).open().close()  # resumes
    new["config"]["model"]["init_args"]["quantizer"] = "lsq"
    with pytest.raises(ConfigMismatchError, match=r"differ in: config\.model\.init_args\.quantizer\."):
        StagedRun(tmp_path, "grid", new).open()


def test_sections_of_a_commands_config_classes_take_their_defaults(tmp_path):
    """A staged command's sections hold one class's arguments (``select``'s ``selection``: SelectionConfig): a setting
    added there keeps the run resumable at its default when the command names the section's class."""
    from lightning_methods.noisy_labels.config import SelectionConfig

    old = {"selection": {"keep_rate": 0.84}, "seed_everything": 0}
    new = {"selection": {"keep_rate": 0.84, "rounds": 3, "lag": 1}, "seed_everything": 0}
    assert fingerprint_diff(old, new) == ["selection.lag", "selection.rounds"]  # the class unknown: differences
    assert fingerprint_diff(old, new, sections={"selection": SelectionConfig}) == []
    StagedRun(tmp_path, "early_cutting", old).open().close()
    StagedRun(tmp_path, "early_cutting", new, sections={"selection": SelectionConfig}).open().close()
    new["selection"]["rounds"] = 4
    with pytest.raises(ConfigMismatchError, match=r"differ in: selection\.rounds\."):
        StagedRun(tmp_path, "early_cutting", new, sections={"selection": SelectionConfig}).open()


def test_stages_are_recorded_and_survive_reopening(tmp_path):
    fp = config_fingerprint(cfg())
    with StagedRun(tmp_path / "run", "demo", fp, config_text="a: 1\n") as run:
        assert not run.is_done("round0")
        run.write_json("round0/stats.json", {"acc": 0.5})
        run.mark_done("round0", {"acc": 0.5})
        wid = run.wandb_id("round0")
        assert run.wandb_id("round0") == wid
    assert (tmp_path / "run" / "config.yaml").read_text() == "a: 1\n"
    assert not (tmp_path / "run" / ".lock").exists()  # released
    with StagedRun(tmp_path / "run", "demo", fp, config_text="b: 2\n") as again:
        assert again.record("round0") == {"acc": 0.5} and again.wandb_id("round0") == wid
    assert (tmp_path / "run" / "config.yaml").read_text() == "a: 1\n"  # the run's own config is kept


def test_other_settings_kind_or_resume_false_are_refused(tmp_path):
    StagedRun(tmp_path, "demo", config_fingerprint(cfg())).open().close()
    with pytest.raises(ConfigMismatchError, match=r"differ in: trainer\.max_epochs"):
        StagedRun(tmp_path, "demo", config_fingerprint(_epochs(5))).open()
    with pytest.raises(ConfigMismatchError, match="'demo' run, not a 'other' run"):
        StagedRun(tmp_path, "other", config_fingerprint(cfg())).open()
    with pytest.raises(FileExistsError, match="--resume true"):
        StagedRun(tmp_path, "demo", config_fingerprint(cfg()), resume=False).open()
    assert not (tmp_path / ".lock").exists()  # a refused open leaves no lock behind


def _epochs(n: int) -> Namespace:
    c = cfg()
    c.trainer.max_epochs = n
    return c


def test_lock_refuses_a_live_holder_and_replaces_a_dead_ones(tmp_path):
    fp = config_fingerprint(cfg())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(RunLockedError, match=f"in use by process {live.pid}"):
            StagedRun(tmp_path, "demo", fp).open()
        assert (tmp_path / ".lock").exists()  # not ours to remove
    finally:
        live.kill()
        live.wait()
    # the holder is dead now: its lock is stale and replaced
    run = StagedRun(tmp_path, "demo", fp).open()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] != live.pid
    with pytest.raises(RunLockedError):  # a second opener while the first works
        StagedRun(tmp_path, "demo", fp).open()
    run.close()


def test_corrupt_state_file_is_reported(tmp_path):
    StagedRun(tmp_path, "demo", {}).open().close()
    (tmp_path / "state.json").write_text('{"kind": "demo", "stag')
    with pytest.raises(ValueError, match="state.json is not valid JSON"):
        StagedRun(tmp_path, "demo", {}).open()


def test_stage_logger_settings_point_each_stage_at_its_own_wandb_run(tmp_path):
    trainer = {"logger": [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "p"}},
                          {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}}]}
    with StagedRun(tmp_path / "exp", "demo", {}) as run:
        run.stage_logger_settings(trainer, "round1")
        init = trainer["logger"][0]["init_args"]
        assert init == {"project": "p", "name": "exp-round1", "group": "exp", "job_type": "round1",
                        "id": run.wandb_id("round1"), "resume": "allow"}
        assert trainer["logger"][1]["init_args"] == {"save_dir": "."}


@pytest.mark.parametrize("refusal", ["settings", "lock"])
def test_a_refusal_on_rank_zero_reaches_every_rank(tmp_path, monkeypatch, refusal):
    """Under a process group (``ood`` under torchrun joins one before its first stage) rank zero locks the directory
    and checks the recorded run, and the other ranks wait for its answer in a broadcast: a refusal must travel in that
    broadcast, so every rank raises it instead of waiting for a broadcast that never comes."""
    import lightning_methods.runs as runs

    StagedRun(tmp_path, "demo", config_fingerprint(cfg())).open().close()
    if refusal == "lock":
        (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "another-host"}))
        error, fp = RunLockedError, config_fingerprint(cfg())
    else:
        error, fp = ConfigMismatchError, config_fingerprint(_epochs(5))
    sent = []
    monkeypatch.setattr(runs, "broadcast_object", lambda obj, src=0: sent.append(obj) or obj)
    with pytest.raises(error) as on_zero:
        StagedRun(tmp_path, "demo", fp).open()
    assert len(sent) == 1  # rank zero broadcast its answer before raising
    monkeypatch.setattr(runs, "get_rank", lambda: 1)  # another rank receives what rank zero sent
    monkeypatch.setattr(runs, "broadcast_object", lambda obj, src=0: sent[0])
    with pytest.raises(error) as on_one:
        StagedRun(tmp_path, "demo", fp).open()
    assert str(on_one.value) == str(on_zero.value)


def test_two_processes_that_read_the_same_stale_lock_do_not_both_take_it(tmp_path, monkeypatch):
    """A and B both find the lock of a dead process. A replaces it first; B, acting on what it read before, must not
    delete A's fresh lock: it looks again under the <lock>.break guard and finds A, alive. An empty or unreadable lock
    file is looked at again, then named with what to do."""
    from lightning_methods.runs import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname()}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    a = RunLock(tmp_path).acquire()  # A: the stale lock replaced
    assert RunLock.holder(tmp_path / ".lock")["pid"] == os.getpid()
    reads = iter([stale])  # B's first look: the file as it was before A replaced it
    real = RunLock.holder
    monkeypatch.setattr(RunLock, "holder", staticmethod(lambda path: next(reads, None) or real(path)))
    with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
        RunLock(tmp_path).acquire()
    assert a.locked and RunLock.holder(tmp_path / ".lock")["pid"] == os.getpid()  # A's lock still there
    assert not (tmp_path / ".lock.break").exists()
    a.release()
    monkeypatch.undo()
    (tmp_path / ".lock").write_text("")  # a process killed between creating the file and writing its pid
    with pytest.raises(RunLockedError, match="stays empty or unreadable.*delete the lock file"):
        RunLock(tmp_path).acquire()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="zombies are read from /proc")
def test_the_lock_of_a_killed_process_not_yet_reaped_is_stale(tmp_path):
    """After kill -9 a process stays a zombie until its parent reaps it (a moment under `timeout` or a scheduler):
    it runs no more, so its lock is replaced at once."""
    from lightning_methods.runs import RunLock

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # exited, not reaped: the state in /proc/<pid>/stat is Z
            if Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.02)
        else:
            pytest.fail("the child did not exit")
        (tmp_path / ".lock").write_text(json.dumps({"pid": child.pid, "host": socket.gethostname()}))
        lock = RunLock(tmp_path).acquire()
        assert lock.locked and RunLock.holder(tmp_path / ".lock")["pid"] == os.getpid()
        lock.release()
    finally:
        child.wait()
