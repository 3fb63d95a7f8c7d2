"""The in-process runtime: one full FedFree round and its invariants, metrics and files, kill-and-resume equal to an
uninterrupted run, refusal of a run directory written with other settings, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from fedfree_testing import assert_same_state, kill_and_resume, make_runner, wandb_history_keys

from lightning_methods.federated import FedFree
from lightning_methods.federated.algorithm import cpu_state
from lightning_methods.runs import ConfigMismatchError


class RecordingFedFree(FedFree):
    """FedFree that records what clients upload, their weights after training, and drops client 0's download
    (as if no KGE were positive for it)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.uploads, self.trained = {}, {}

    def upload(self, before, net, extra, info):
        payload = super().upload(before, net, extra, info)
        self.uploads[info.client_id], self.trained[info.client_id] = payload, cpu_state(net)
        return payload

    def aggregate(self, round, uploads):
        metrics = super().aggregate(round, uploads)
        self.pending.pop(0, None)
        self.sent = {c: p.meta["local_name"] for c, p in self.pending.items()}
        return metrics


def test_one_round_invariants_metrics_and_files(tmp_path, one_thread):
    algo = RecordingFedFree(k=2)
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"project": "fedfree-test", "name": "tiny", "save_dir": str(tmp_path / "wandb")}}
    runner = make_runner(tmp_path, algo, logger=logger)
    summary = runner.run()
    shapes = {f: {k: v.shape for k, v in runner.runtime.net(i, c).state_dict().items()}
              for i, (f, c) in enumerate(zip(runner.families, runner.clients))}
    for i, client in enumerate(runner.clients):
        payload = algo.uploads[i]
        assert len(payload.meta["specs"]) == 2  # exactly k layers uploaded
        assert {k.rsplit(".", 1)[0] for k in payload.arrays} == {s["name"] for s in payload.meta["specs"]}
        after, trained = client["weights"], algo.trained[i]
        assert {k: v.shape for k, v in after.items()} == shapes[runner.families[i]]  # architecture unchanged
        changed = {k.rsplit(".", 1)[0] for k in after if not torch.equal(after[k], trained[k])}
        if i in algo.sent:
            assert changed <= {algo.sent[i]}  # only the aligned layer moved
        else:
            assert changed == set()  # no positive KGE (client 0 here): bit-identical after alignment
    record = runner.history[-1]
    assert record["server/clients_aligned"] == len(algo.sent) + (1 if "0" in json.dumps(record["aligned"]) else 0)
    assert 0 <= record["acc/min"] <= record["acc/mean"] <= record["acc/max"] <= 1
    assert summary["final_mean"] == pytest.approx(record["acc/mean"]) and summary["rounds"] == 1
    run_dir = runner.run_dir
    assert run_dir == tmp_path / "run" / "fedfree"
    for name in ("history.csv", "clients.csv", "results.json", "partition.json", "accuracy.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    clients = json.loads((run_dir / "results.json").read_text())["clients"]
    assert [c["family"] for c in clients] == runner.families and all(c["final_acc"] is not None for c in clients)
    expect = {"acc/mean", "acc/min", "acc/max", "server/distill_loss", "server/clients_aligned", "server/aligned",
              "time/server", "local_epochs", "accuracy/_type"}  # accuracy: the accuracy.png picture (an image)
    assert expect <= wandb_history_keys(tmp_path / "wandb")


def test_kill_and_resume_equals_uninterrupted(tmp_path, one_thread, monkeypatch):
    full, resumed, calls = kill_and_resume(tmp_path, lambda: FedFree(k=2, pseudo_batch_size=16), monkeypatch,
                                           momentum=0.9, keep_optimizer_state=True)
    assert calls == [(3, 0), (3, 1)]  # finished rounds are not redone
    ca, cb = full.clients, resumed.clients
    for a, b in zip(ca, cb):
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for k, st in a["optimizer"]["state"].items():
            assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert_same_state(full.algorithm.server_state_dict(), resumed.algorithm.server_state_dict())
    assert [h["client_acc"] for h in full.history] == [h["client_acc"] for h in resumed.history]
    assert json.dumps([h["aligned"] for h in full.history]) == json.dumps([h["aligned"] for h in resumed.history])


def test_run_dir_of_other_settings_is_refused(tmp_path, one_thread):
    def runner(lr: float):
        return make_runner(tmp_path, FedFree(k=2, pseudo_batch_size=16), num_clients=2, lr=lr)

    runner(0.01).run()
    with pytest.raises(ConfigMismatchError, match="federation.lr"):
        runner(0.05).run()


def test_bad_input_stops_before_training(tmp_path, one_thread):
    with pytest.raises(ValueError, match="k=40 critical layers requested but client family fedavg_cnn has only 4"):
        make_runner(tmp_path / "k", FedFree(k=40)).run()
    with pytest.raises(ValueError, match="unknown client family 'resnet9000'"):
        make_runner(tmp_path / "f", FedFree(), families=["resnet9000"])
    with pytest.raises(ValueError, match="k \\(critical layers per client\\) must be >= 1"):
        FedFree(k=0)
    runner = make_runner(tmp_path / "d", FedFree())
    runner.trainer["devices"] = 2
    with pytest.raises(ValueError, match="trainer.devices=2: clients train one after another"):
        runner.run()


def test_history_csv_grows_round_by_round(tmp_path, one_thread, monkeypatch):
    """docs/methods/federated.md, "Watching a run": the per-round metrics are in ``history.csv`` while the run goes
    on (here: read after a kill in round 2, which left round 1 recorded), not only once the last round is done."""
    import csv

    from fedfree_testing import Killed

    from lightning_methods.federated import LocalOnly
    from lightning_methods.federated.local import ClientRuntime

    fit = ClientRuntime.fit

    def dying_fit(self, i, client, round):
        if round == 2:
            raise Killed(f"killed in round {round}")
        return fit(self, i, client, round)

    monkeypatch.setattr(ClientRuntime, "fit", dying_fit)
    runner = make_runner(tmp_path, LocalOnly(), rounds=2, num_clients=2)
    with pytest.raises(Killed):
        runner.run()
    rows = list(csv.DictReader((runner.run_dir / "history.csv").open()))
    assert [int(r["round"]) for r in rows] == [1]
    assert float(rows[0]["acc/mean"]) == pytest.approx(runner.history[0]["acc/mean"], rel=1e-12)
    assert not (runner.run_dir / "results.json").exists()  # the run is not finished


def test_kill_before_a_round_is_recorded_keeps_the_recorded_rounds_checkpoint(tmp_path, one_thread, monkeypatch):
    """A kill after round 2's checkpoint is written but before round 2 is recorded in state.json resumes from round
    1, so round 1's checkpoint must still be on disk then (keep_checkpoints=1 deletes it only once round 2 is
    recorded)."""
    from fedfree_testing import Killed

    from lightning_methods.federated import LocalOnly
    from lightning_methods.runs import StagedRun

    mark_done = StagedRun.mark_done

    def dying_mark_done(self, stage, record=None):
        if stage == "round2":
            raise Killed("killed before round 2 was recorded")
        return mark_done(self, stage, record)

    with monkeypatch.context() as patch:
        patch.setattr(StagedRun, "mark_done", dying_mark_done)
        with pytest.raises(Killed):
            make_runner(tmp_path, LocalOnly(), rounds=2, num_clients=2, keep_checkpoints=1).run()
    resumed = make_runner(tmp_path, LocalOnly(), rounds=2, num_clients=2, keep_checkpoints=1)
    assert resumed.run()["rounds"] == 2
    assert sorted(p.name for p in (resumed.run_dir / "checkpoints").glob("*.pt")) == ["round0002.pt"]
