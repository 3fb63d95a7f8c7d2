"""``lightning-methods-select``: every shipped Early Cutting config parses and instantiates; the command runs end to
end (selection round, the cut, final round, files, W&B runs); on noisy digits the procedure removes mostly mislabeled
samples; a paused run continues without recomputing finished rounds; an interrupted round resumes from its
checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch import nn

from lightning_methods.callbacks import TestAccuracyTracker
from lightning_methods.datamodules import label_noise
from lightning_methods.noisy_labels import runner as selection_runner
from lightning_methods.noisy_labels.cli import build_parser, main, run_select
from lightning_methods.noisy_labels.runner import EarlyCuttingRunner
from lightning_methods.noisy_labels.selection import simulate_selection_round
from lightning_methods.results.record import find_records

from helpers import write_fake_cifar

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs" / "noisy_labels").glob("*.yaml")
                 if "selection" in (yaml.safe_load(p.read_text()) or {}))
DIGITS = REPO / "configs" / "noisy_labels" / "digits_sym40.yaml"
QUIET = ["--trainer.logger=false", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


class SmallCNN(nn.Sequential):
    """Two conv layers: learns digits in a few epochs, far cheaper than a ResNet (test backbone)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, num_classes))


SMALL = '--model.init_args.backbone={"class_path": "test_early_cutting_select.SmallCNN"}'


def _data_args(path: Path, data_root: Path, tmp_path: Path) -> list[str]:
    init = yaml.safe_load(path.read_text())["data"]["init_args"]
    args = []
    if "data_dir" in init:
        args += [f"--data.init_args.data_dir={data_root}", "--data.init_args.download=false",
                 "--data.init_args.num_workers=0"]
    if init.get("noise_type") == "cifarn":
        clean = np.asarray(pickle.load(open(data_root / "cifar-100-python" / "train", "rb"),
                                       encoding="latin1")["fine_labels"])
        torch.save({"clean_label": clean, "noisy_label": (clean + 1) % 100}, tmp_path / "CIFAR-100_human.pt")
        args.append(f"--data.init_args.cifarn_file={tmp_path / 'CIFAR-100_human.pt'}")
    return args


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_select_config_parses_and_instantiates(path, fake_cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []  # PTD noise on CIFAR-100 draws a 100 x 3072 x 100 matrix; its generator is tested in test_noise.py

    def fake_instance_noise(images, labels, rate, num_classes, seed):
        calls.append((images.shape[1:], rate, num_classes, seed))
        return (np.asarray(labels) + 1) % num_classes

    monkeypatch.setattr(label_noise, "instance_noise", fake_instance_noise)
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(path), *_data_args(path, fake_cifar_root[0], tmp_path),
                             "--model.init_args.backbone=resnet8", f"--run_dir={tmp_path / 'run'}"])
    raw = yaml.safe_load(path.read_text())
    for key, value in raw["selection"].items():
        assert cfg.selection[key] == value
    init = parser.instantiate_classes(cfg)
    assert init.model.num_classes == init.data.num_classes  # linked
    init.data.setup("fit")
    assert init.data.noise_stats["noise/realized_rate"] > 0
    if raw["data"]["init_args"].get("noise_type") == "instance":  # raw HWC pixels, the config's rate, seed 1
        assert calls == [((32, 32, 3), raw["data"]["init_args"]["noise_rate"], init.data.num_classes, 1)]
    Trainer(**{**init.trainer, "logger": False})
    assert "selection:" in parser.dump(cfg)


def test_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(DIGITS), "--selection.rounds=1", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["selection"]["rounds"] == 1 and printed["model"]["class_path"].endswith("CoTrainingClassifier")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--selection.keep_rate" in capsys.readouterr().out


def _learnable_fake_cifar10(root: Path) -> None:
    """Fake CIFAR-10 whose images are class templates plus noise (learnable in a few steps)."""
    arrays = write_fake_cifar(root, "cifar10", n_train=240, n_test=60, seed=4)
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (10, 3, 32, 32))
    folder = root / "cifar-10-batches-py"
    chunks = np.array_split(np.arange(240), 5)
    for name, labels in [*((f"data_batch_{i + 1}", arrays["train_y"][c]) for i, c in enumerate(chunks)),
                         ("test_batch", arrays["test_y"])]:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        x = np.clip(templates[labels] + rng.normal(0, 20, (len(labels), 3, 32, 32)), 0, 255).astype(np.uint8)
        entry["data"] = x.reshape(len(labels), -1)
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)


def test_select_command_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _learnable_fake_cifar10(tmp_path / "data")
    run = tmp_path / "run"
    summary = run_select([
        "--config", str(REPO / "configs/noisy_labels/cifar10_sym40.yaml"),
        f"--data.init_args.data_dir={tmp_path}/data",
        "--data.init_args.download=false", "--data.init_args.num_workers=0", "--data.init_args.batch_size=16",
        "--data.init_args.eval_batch_size=128", SMALL, "--trainer.max_epochs=4",
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.offline=true", f"--trainer.logger.init_args.save_dir={tmp_path}/wandb",
        "--selection.rounds=1", "--selection.warm_up_epochs=-1", "--selection.k=1", "--selection.lag=0",
        "--selection.keep_rate=0.2", f"--run_dir={run}",
    ])
    assert summary["status"] == "done" and summary["final"]["status"] == "done"
    (record,) = find_records([run])  # what `lightning-methods table` reads: the config named, its seed, the metrics
    assert record["config_path"][-1].endswith("configs/noisy_labels/cifar10_sym40.yaml") and record["seed"] == 1
    assert record["metrics"]["test_acc_last"] == summary["test_acc_last"]
    stats = json.loads((run / "round0" / "stats.json").read_text())
    fkl, removed, selected = (np.load(run / "round0" / f"{n}.npy") for n in ("fkl", "removed", "selected"))
    assert stats["stop_epoch"] is not None and len(fkl) >= stats["threshold"]
    # the later state is the best noisy-val checkpoint among epochs <= the stop epoch: the round ends there
    last = torch.load(run / "round0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == stats["stop_epoch"] and int(stats["best_checkpoint"][5:8]) <= stats["stop_epoch"]
    assert set(removed) <= set(fkl) and selected.tolist() == [i for i in fkl if i not in set(removed)]
    labels = torch.load(run / "noisy_labels.pt")
    wrong = (labels["noisy"] != labels["clean"]).numpy()
    assert stats["removed_mislabeled"] == wrong[removed].sum() and stats["selected_size"] == len(selected)
    scores = torch.load(run / "round0" / "cut_scores.pt")
    assert set(removed) <= set(scores["candidates"].tolist()) <= set(scores["subset"].tolist())
    assert np.array_equal(np.load(run / "final" / "train_indices.npy"), np.sort(selected))
    assert summary["test_acc_last"] is not None and summary["test_acc_at_best_val"] is not None
    assert len(list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))) == 2  # one W&B run per round


def _digits_args(run: Path, *extra: str) -> list[str]:
    return ["--config", str(DIGITS), *QUIET, SMALL, f"--run_dir={run}", "--trainer.max_epochs=8",
            "--model.init_args.lr_scheduler.init_args.T_max=8", "--selection.warm_up_epochs=0", "--selection.k=2",
            "--selection.keep_rate=0.6", *extra]


def test_digits_procedure_removes_mislabeled_samples_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    paused = run_select(_digits_args(run, "--stop_after_round=0"))
    assert paused == {"status": "paused", "round": 0}
    assert (run / "round0" / "selected.npy").is_file() and not (run / "round1").exists()
    round0_stats = (run / "round0" / "stats.json").read_text()

    calls = []
    original = EarlyCuttingRunner.selection_round
    monkeypatch.setattr(EarlyCuttingRunner, "selection_round",
                        lambda self, r, idx: calls.append(r) or original(self, r, idx))
    summary = run_select(_digits_args(run))
    assert calls == [1]  # round 0 was not recomputed
    assert (run / "round0" / "stats.json").read_text() == round0_stats
    assert summary["status"] == "done"

    labels = torch.load(run / "noisy_labels.pt")
    wrong = (labels["noisy"] != labels["clean"]).numpy()
    r0 = json.loads(round0_stats)
    noise_rate = r0["train_mislabeled_rate"]
    final = np.load(run / "final" / "train_indices.npy")
    train = torch.load(run / "round0" / "history.pt")["indices"].numpy()  # round 0 trains on the whole split
    assert wrong[train].mean() == pytest.approx(noise_rate)
    excluded = np.setdiff1d(train, final)
    assert wrong[excluded].mean() > 1.5 * noise_rate  # what the procedure removes is mostly mislabeled
    assert wrong[final].mean() < 0.5 * noise_rate  # the final subset is much cleaner than the full set
    assert summary["final"]["train_mislabeled_rate"] == pytest.approx(wrong[final].mean())
    # the cut: high loss under the later model finds mislabeled samples inside the early-learned subset
    assert r0["candidates_mislabeled_rate"] > r0["cut_subset_mislabeled_rate"]
    assert set(np.load(run / "round0" / "removed.npy")) <= set(torch.load(run / "round0" / "cut_scores.pt")
                                                              ["candidates"].tolist())
    with pytest.raises(ValueError, match="differ in: selection.keep_rate"):
        run_select(_digits_args(run, "--selection.keep_rate=0.5"))


def crash_after_epoch(epoch: int):
    """A hook that simulates a killed job: raises after the checkpoint of ``epoch`` was written."""

    def hook(self, trainer, pl_module) -> None:
        if trainer.current_epoch == epoch + 1:
            raise RuntimeError("simulated crash")

    return hook


def test_interrupted_round_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = ["--selection.rounds=1", "--selection.final_round=false"]
    with monkeypatch.context() as patch:  # the same command, killed after epoch 1
        patch.setattr(TestAccuracyTracker, "on_train_epoch_start", crash_after_epoch(1), raising=False)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_select(_digits_args(run, *args))
    saved = torch.load(run / "round0" / "checkpoints" / "last.ckpt")
    assert saved["epoch"] == 1 and not (run / "round0" / "stats.json").exists()
    fits = []
    original = Trainer.fit
    monkeypatch.setattr(Trainer, "fit",
                        lambda self, *a, **kw: fits.append(kw.get("ckpt_path")) or original(self, *a, **kw))
    stats = run_select(_digits_args(run, *args))["rounds"]["0"]
    assert len(fits) == 1 and fits[0].endswith("last.ckpt")  # continued, not restarted
    # the restored counters continue the records of the crashed run: replaying the whole saved prediction history
    # with the pure selection rule gives the stop epoch and the selection of the resumed run
    history = torch.load(run / "round0" / "history.pt")
    assert history["recorded_epochs"][0] == 1 and len(history["recorded_epochs"]) > 1 and stats["stop_epoch"] > 2
    preds = torch.stack([p.long() for p in history["predictions"]], 1)
    preds = torch.cat([torch.zeros(len(preds), 1, dtype=torch.long), preds], 1)  # epoch 0 is warm-up
    stop, selection = simulate_selection_round(preds, history["targets"], history["indices"], 0.6, 0, 2, lag=1)
    assert stop == stats["stop_epoch"] and np.array_equal(np.load(run / "round0" / "fkl.npy"), selection.numpy())


def test_round_stopped_before_its_files_were_written_is_restored_without_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _digits_args(tmp_path / "run", "--selection.rounds=1", "--selection.final_round=false")

    def crash(*a, **kw):
        raise RuntimeError("killed during the cut")

    monkeypatch.setattr(selection_runner, "compute_early_cut", crash)
    with pytest.raises(RuntimeError, match="during the cut"):
        run_select(args)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    fits = []
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **kw: fits.append(1))
    stats = run_select(args)["rounds"]["0"]
    assert fits == [] and stats["status"] == "done"  # the stopped round's selection came from its checkpoint
    fkl, removed, selected = (np.load(tmp_path / "run" / "round0" / f"{n}.npy") for n in ("fkl", "removed", "selected"))
    assert len(fkl) >= stats["threshold"] and selected.tolist() == [i for i in fkl if i not in set(removed)]


def test_a_cut_short_round_is_never_recorded_and_other_trainer_settings_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = ["--selection.rounds=1", "--selection.final_round=false", "--trainer.max_steps=2"]
    out = run_select(_digits_args(run, *args))
    assert out == {"status": "interrupted", "round": 0}  # 2 steps end the fit before any epoch completes
    state = json.loads((run / "state.json").read_text())
    assert state["stages"] == {} and not (run / "round0" / "stats.json").exists()
    assert state["fingerprint"]["trainer"]["max_steps"] == 2
    assert state["fingerprint"]["model"]["init_args"]["num_classes"] == 10  # the linked value, not the default 100
    with pytest.raises(ValueError, match=r"differ in: trainer\.max_epochs, trainer\.max_steps"):
        run_select(_digits_args(run, "--selection.rounds=1", "--selection.final_round=false",
                                "--trainer.max_epochs=3"))
    assert json.loads((run / "state.json").read_text()) == state  # the refused command changed nothing


def test_a_second_command_on_a_busy_run_directory_stops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # a live process
    with pytest.raises(RuntimeError, match="is in use by process"):
        run_select(_digits_args(run, "--selection.rounds=1"))
    assert not (run / "state.json").exists()


def test_a_diverging_round_is_stopped_by_the_guard(tmp_path, monkeypatch):
    """The runner's Trainers carry the NonFiniteGuard of ``lightning-methods fit``: a round whose loss goes
    non-finite stops within a few steps with the guard's error instead of training on NaNs for the whole round."""
    from lightning_methods.callbacks import NonFiniteTrainingError

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(DIGITS), SMALL, "--trainer.max_epochs=2", "--trainer.logger=false",
            "--model.init_args.optimizer.init_args.lr=1e30", "--selection.rounds=1", f"--run_dir={tmp_path / 'run'}"]
    with pytest.raises(NonFiniteTrainingError):
        run_select(args)
    assert "nonfinite_guard:" in build_parser().dump(build_parser().parse_args(["--config", str(DIGITS)]))
