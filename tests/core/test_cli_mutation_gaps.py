"""Gaps found by mutation testing of the command-line layer and the run records: the repeated-key check of ``.yml``
files, ``fit`` on a config of ``fed`` that names only its algorithm, the factories a checkpoint records, which run
``--ckpt_path last`` resumes, the ``test_after_fit`` choice, and the formats of the record files."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lightning_methods import cli
from lightning_methods.hparams import checkpoint_safe, describe_callable


def test_a_yml_file_with_a_repeated_key_is_refused_like_a_yaml_file(tmp_path):
    """Both YAML suffixes are read for repeated keys: a ``.yml`` config keeps the last of two equal keys as silently
    as a ``.yaml`` one, so it is refused naming the key and its line (given as ``--config F`` and ``--config=F``)."""
    bad = tmp_path / "mine.yml"
    bad.write_text("trainer:\n  max_epochs: 3\n  max_epochs: 30\n")
    with pytest.raises(ValueError, match=r"mine\.yml: .*'max_epochs' again on line 3"):
        cli.check_repeated_keys(["fit", "--config", str(bad)])
    with pytest.raises(ValueError, match=r"'max_epochs' again on line 3"):
        cli.check_repeated_keys(["fit", f"--config={bad}"])
    good = tmp_path / "good.yml"
    good.write_text("trainer:\n  max_epochs: 3\n")
    cli.check_repeated_keys(["fit", "--config", str(good)])


def test_fit_on_a_config_that_names_only_its_algorithm_points_to_fed(tmp_path):
    """``algorithm`` is a top-level key only ``lightning-methods fed`` configs have (besides ``federation``): ``fit``
    on a config with it alone names ``fed`` in one line, before the LightningCLI parser lists every unknown key."""
    config = tmp_path / "fed_only_algorithm.yaml"
    config.write_text("algorithm: fedfree\nseed_everything: 0\n")
    says = rf"top-level key 'algorithm'\); run: lightning-methods fed --config {config}$"
    with pytest.raises(SystemExit, match=says):
        cli.main(["fit", "--config", str(config)])


def test_a_partial_with_positional_arguments_is_recorded_as_text_never_as_a_loadable_factory():
    """A ``functools.partial`` with positional arguments has no ``{"class_path", "init_args"}`` form: recording it as
    one would drop its positional arguments and rebuild another factory on load. It is recorded as text (which loads
    for evaluation and says so when the optimizer is built); a keyword-only partial keeps the loadable form."""
    positional = functools.partial(torch.optim.SGD, [], lr=0.1)  # params given positionally
    recorded = describe_callable(positional)
    assert isinstance(recorded, str) and recorded == repr(positional)
    assert describe_callable(functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)) == {
        "class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}}


def _wandb_config(save_dir: Path, **model) -> dict:
    return {"ckpt_path": "last", "model": {"class_path": "lightning_methods.ImageClassifier", "init_args": model},
            "trainer": {"max_epochs": 4, "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                                    "init_args": {"save_dir": str(save_dir), "project": "p"}}}}


def _recorded_run(root: Path, run_id: str, config: dict, mtime: float) -> Path:
    """A run directory as a fit leaves it: ``config.yaml`` (with its own id) and ``checkpoints/last.ckpt``."""
    saved = yaml.safe_load(yaml.safe_dump(config))
    saved["ckpt_path"] = None
    saved["trainer"]["logger"]["init_args"]["id"] = run_id
    (root / run_id / "checkpoints").mkdir(parents=True)
    (root / run_id / "config.yaml").write_text(yaml.safe_dump(saved))
    last = root / run_id / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    os.utime(last, (mtime, mtime))
    return last


def test_ckpt_path_last_resumes_the_newest_run_of_the_same_config_and_continues_its_logger_run(tmp_path):
    """Of several runs under the logger's directory, ``--ckpt_path last`` takes the one whose ``last.ckpt`` was saved
    last among those with the same settings (a newer run of other settings is passed over), and the logger continues
    that run (its W&B id), so the resume writes into the run it resumes."""
    from lightning_methods.cli_runs import EXTENSION_KEYS, ResumeError, resolve_last_checkpoint

    root = tmp_path / "p"
    same = _wandb_config(tmp_path, lr=0.1)
    older = _recorded_run(root, "r000000000a1", same, 1_000_000)
    newer = _recorded_run(root, "r000000000b2", same, 2_000_000)
    _recorded_run(root, "r000000000c3", _wandb_config(tmp_path, lr=0.5), 3_000_000)  # newest, other settings
    assert older.stat().st_mtime < newer.stat().st_mtime
    line = resolve_last_checkpoint(same, yaml.safe_load(yaml.safe_dump(same)))
    assert same["ckpt_path"] == str(newer)
    assert same["trainer"]["logger"]["init_args"]["id"] == "r000000000b2"
    assert "resuming run r000000000b2, the latest of 3 run(s)" in line
    # an evaluation (ignoring how long a run trained) finds the run whatever its max_epochs; a fit does not
    longer = _wandb_config(tmp_path, lr=0.1)
    longer["trainer"]["max_epochs"] = 40
    dumped = yaml.safe_load(yaml.safe_dump(longer))
    with pytest.raises(ResumeError, match=r"differs in trainer\.max_epochs"):
        resolve_last_checkpoint(longer, dumped)
    resolve_last_checkpoint(longer, dumped, EXTENSION_KEYS)
    assert longer["ckpt_path"] == str(newer) and longer["trainer"]["logger"]["init_args"]["id"] == "r000000000b2"


def _after_fit(mode: str, best_model_path: str, interrupted: bool = False) -> list:
    """The ``trainer.test`` calls that ``LightningMethodsCLI.after_fit`` makes for ``--test_after_fit mode``."""
    from lightning_methods.cli_lightning import LightningMethodsCLI

    calls = []
    checkpoint = SimpleNamespace(best_model_path=best_model_path)
    trainer = SimpleNamespace(interrupted=interrupted, checkpoint_callback=checkpoint,
                              test=lambda *args, **kwargs: calls.append((args, kwargs)))
    fake = SimpleNamespace(subcommand="fit", config={"fit": {"test_after_fit": mode}}, trainer=trainer, model="model",
                           datamodule="data")
    LightningMethodsCLI.after_fit(fake)
    return calls


def test_test_after_fit_best_tests_the_best_checkpoint_and_last_the_final_weights():
    """``best``: the best checkpoint (``ckpt_path="best"``), or the weights in memory when there is none; ``last``: the
    final weights (``ckpt_path=None``, recorded as ``null``), never the best checkpoint; ``off`` and an interrupted fit
    test nothing. Every test loads weights-only."""
    assert _after_fit("best", "/run/checkpoints/best-002.ckpt") == [
        (("model",), {"datamodule": "data", "ckpt_path": "best", "weights_only": True})]
    assert _after_fit("best", "") == [(("model",), {"datamodule": "data", "ckpt_path": None, "weights_only": True})]
    assert _after_fit("last", "/run/checkpoints/best-002.ckpt") == [
        (("model",), {"datamodule": "data", "ckpt_path": None, "weights_only": True})]
    assert _after_fit("off", "/run/checkpoints/best-002.ckpt") == []
    assert _after_fit("best", "/run/checkpoints/best-002.ckpt", interrupted=True) == []
    assert _after_fit("last", "/run/checkpoints/best-002.ckpt", interrupted=True) == []


def test_checkpoint_hyperparameters_name_the_module_by_its_public_path_and_load_weights_only(tmp_path):
    """``checkpoint_safe`` replaces LightningCLI's ``_class_path`` (the class as the config spelled it: a short name,
    or a module path that may move) by the shortest public path of the module's class, the one
    ``LightningCLI`` resolves in any later process; callables become the ``{"class_path", "init_args"}`` form and a
    lambda, which has no import path, its text. The result loads with ``weights_only=True``."""
    from lightning_methods import ImageClassifier

    hparams = {"_class_path": "ImageClassifier", "num_classes": 10, "backbone": "resnet8",
               "optimizer": functools.partial(torch.optim.SGD, lr=0.05), "lr_scheduler": lambda opt: opt}
    safe = checkpoint_safe(hparams, ImageClassifier)
    assert safe["_class_path"] == "lightning_methods.ImageClassifier"
    assert safe["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}
    assert isinstance(safe["lr_scheduler"], str) and "<lambda>" in safe["lr_scheduler"]
    assert safe["num_classes"] == 10 and safe["backbone"] == "resnet8"
    assert checkpoint_safe(hparams)["_class_path"] == "ImageClassifier"  # no class given: left as spelled
    torch.save({"hyper_parameters": safe}, tmp_path / "h.ckpt")
    assert torch.load(tmp_path / "h.ckpt", weights_only=True)["hyper_parameters"] == safe


def test_best_is_the_first_of_equal_epochs_and_holds_only_validation_metrics():
    """``best_and_last``: an epoch that only equals the best keeps the earlier one (as ModelCheckpoint keeps it), in
    both modes; the best and last views hold the validation metrics of their epoch, never the training ones; the
    flat view adds a standalone ``validate`` record's metrics under their own names."""
    from lightning_methods.results.record import best_and_last, flat_metrics

    history = [{"epoch": 0, "val/acc": 0.5, "val/loss": 2.0, "train/loss": 1.0},
               {"epoch": 1, "val/acc": 0.5, "val/loss": 2.0, "train/loss": 0.5},
               {"epoch": 2, "val/acc": 0.25, "val/loss": 3.0, "train/loss": 0.25}]
    best, last = best_and_last(history, "val/acc", "max")
    assert best == {"epoch": 0, "metrics": {"val/acc": 0.5, "val/loss": 2.0}}
    assert last == {"epoch": 2, "metrics": {"val/acc": 0.25, "val/loss": 3.0}}
    assert best_and_last(history, "val/loss", "min")[0]["epoch"] == 0
    flat = flat_metrics({"best": best, "last": last, "validate": {"checkpoint": None, "metrics": {"val/acc": 0.75}},
                         "test": {"checkpoint": None, "metrics": {"test/acc": 0.625}}})
    assert flat == {"best/epoch": 0, "best/val/acc": 0.5, "best/val/loss": 2.0, "last/epoch": 2,
                    "last/val/acc": 0.25, "last/val/loss": 3.0, "val/acc": 0.75, "test/acc": 0.625}


def test_the_config_hash_does_not_depend_on_key_order_nor_on_the_run_id():
    """``config_hash`` is the SHA-256 of the canonical JSON (sorted keys), and ``identity_config`` clears the logger's
    ``id`` / ``version`` and ``ckpt_path``: two runs of one config (resumed or not, in any key order) share a hash."""
    import hashlib
    import json

    from lightning_methods.callbacks.results_writer import identity_config
    from lightning_methods.results.record import config_hash

    one = {"trainer": {"max_epochs": 3, "logger": {"class_path": "W", "init_args": {"id": "r1", "project": "p"}}},
           "model": {"lr": 0.1}, "ckpt_path": None}
    two = {"ckpt_path": "/run/checkpoints/last.ckpt", "model": {"lr": 0.1},
           "trainer": {"logger": {"init_args": {"project": "p", "id": "r2"}, "class_path": "W"}, "max_epochs": 3}}
    assert config_hash(identity_config(one)) == config_hash(identity_config(two))
    assert config_hash({"b": 1, "a": 2}) == hashlib.sha256(b'{"a": 2, "b": 1}').hexdigest()
    assert identity_config(two)["trainer"]["logger"]["init_args"] == {"project": "p", "id": None}
    assert json.dumps(identity_config(two), sort_keys=True) == json.dumps(identity_config(one), sort_keys=True)


def test_metrics_csv_has_the_progress_columns_first_and_nine_significant_digits():
    """``metrics.csv``: ``epoch, step, time_s, lr`` first (those present), then the metrics sorted; floats with 9
    significant digits, which give back every float32 exactly (a float32 has 24 bits: 9 decimal digits suffice, 8 do
    not for every value), empty cells for a metric an epoch lacks."""
    from lightning_methods.results.record import metrics_csv_text, read_metrics_csv

    # float32 values in [512, 1024) are 2^-14 ~ 6.1e-5 apart, finer than 8 digits there (1e-4): two neighbours
    up = torch.tensor(2000.0)
    value = torch.nextafter(torch.tensor(1000.0), up)  # 1000 + 2^-14 = 1000.00006103515625
    value, near = float(value), float(torch.nextafter(value, up))  # and 1000 + 2^-13 = 1000.0001220703125
    rows = [{"val/acc": value, "epoch": 0, "train/loss": near, "lr": 0.05, "step": 5},
            {"epoch": 1, "step": 10, "lr": 0.05, "train/loss": 0.5}]
    text = metrics_csv_text(rows)
    assert text.splitlines() == ["epoch,step,lr,train/loss,val/acc",
                                 f"0,5,0.05,{near:.9g},{value:.9g}", "1,10,0.05,0.5,"]
    assert f"{value:.8g}" == f"{near:.8g}"  # 8 digits would give two float32 values one text
    back = read_metrics_csv_text(text, read_metrics_csv)
    assert float(torch.tensor(back[0]["val/acc"], dtype=torch.float32)) == value
    assert float(torch.tensor(back[0]["train/loss"], dtype=torch.float32)) == near


def read_metrics_csv_text(text: str, reader) -> list:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "metrics.csv"
        path.write_text(text)
        return reader(path)


def test_prediction_csv_columns_and_digits():
    """``predictions.csv``: ``index, target, pred, confidence`` first whatever order ``predict_step`` returns them in,
    then the other per-sample scalars, then ``prob_0 ... prob_{C-1}`` in class order; integers as integers, floats with
    9 significant digits (each float32 comes back exactly)."""
    from lightning_methods.callbacks.prediction_writer import predictions_csv_text

    third = torch.tensor([1 / 3, 2 / 3], dtype=torch.float32)
    near = torch.nextafter(third, torch.ones(2))
    columns = {"confidence": third, "pred": torch.tensor([2, 0]), "energy": near, "index": torch.tensor([7, 9]),
               "target": torch.tensor([2, 1]), "probs": torch.stack([third, near, 1 - third - near], dim=1)}
    lines = predictions_csv_text(columns).splitlines()
    assert lines[0] == "index,target,pred,confidence,energy,prob_0,prob_1,prob_2"
    cells = [line.split(",") for line in lines[1:]]
    assert [c[:3] for c in cells] == [["7", "2", "2"], ["9", "1", "0"]]
    for row, c in enumerate(cells):
        expected = [third[row], near[row], third[row], near[row], 1 - third[row] - near[row]]
        assert c[3:] == [f"{float(v):.9g}" for v in expected]
        assert [torch.tensor(float(x), dtype=torch.float32) for x in c[3:]] == expected  # exact round trip


def test_run_directories_of_numbered_logger_versions_are_named_version_n(tmp_path):
    """CSV / TensorBoard versions are numbers that Lightning puts in ``version_<n>`` folders: the run directory the
    record names (``run_directory``) and the one a fit with a given version will use (``planned_run_dir``, where the
    lock and the config check go before the logger starts) are that folder; a text version (a W&B id) is the
    folder's name itself."""
    from lightning_methods.cli_runs import planned_run_dir
    from lightning_methods.results.record import run_directory

    def trainer(version):
        logger = SimpleNamespace(save_dir=str(tmp_path / "logs"), name="quick", version=version)
        return SimpleNamespace(checkpoint_callback=None, loggers=[logger], default_root_dir=str(tmp_path))

    assert run_directory(trainer(3)) == tmp_path / "logs" / "quick" / "version_3"
    assert run_directory(trainer("r0123456789a")) == tmp_path / "logs" / "quick" / "r0123456789a"
    csv = {"class_path": "lightning.pytorch.loggers.CSVLogger",
           "init_args": {"save_dir": str(tmp_path / "logs"), "name": "quick", "version": 3}}
    assert planned_run_dir({"trainer": {"logger": csv}}) == tmp_path / "logs" / "quick" / "version_3"
    csv["init_args"]["version"] = 0  # version 0 is a given version too
    assert planned_run_dir({"trainer": {"logger": csv}}) == tmp_path / "logs" / "quick" / "version_0"
    csv["init_args"]["version"] = "mine"
    assert planned_run_dir({"trainer": {"logger": csv}}) == tmp_path / "logs" / "quick" / "mine"


def test_the_wall_time_in_a_checkpoint_adds_up_the_pieces_of_a_run():
    """``ResultsWriter.state_dict``: the seconds saved in a checkpoint are those of the earlier pieces of the run plus
    this one's, so ``wall_time_s`` of a run resumed twice is the time of all three pieces."""
    from lightning_methods.callbacks import ResultsWriter

    writer = ResultsWriter()
    writer._stage = "fit"
    writer.load_state_dict({"history": [], "seconds": 1000.0, "late_keys": []})
    saved = writer.state_dict()["seconds"]
    assert 1000.0 < saved < 1000.0 + writer._elapsed() + 1e-6  # 1000 s before, plus this piece's few milliseconds


def test_the_best_of_a_loss_is_its_minimum_unless_told_otherwise():
    """Without a ModelCheckpoint monitoring it, ``ResultsWriter`` takes the best of a metric named like a loss as its
    minimum and of anything else as its maximum; an explicit ``mode`` wins."""
    from lightning_methods.callbacks import ResultsWriter

    trainer = SimpleNamespace(checkpoint_callback=None)
    assert ResultsWriter(monitor="val/loss")._monitor(trainer) == ("val/loss", "min")
    assert ResultsWriter(monitor="val/acc")._monitor(trainer) == ("val/acc", "max")
    assert ResultsWriter()._monitor(trainer) == ("val/acc", "max")
    assert ResultsWriter(monitor="val/loss", mode="max")._monitor(trainer) == ("val/loss", "max")
    checkpoint = SimpleNamespace(monitor="val/loss", mode="max")
    assert ResultsWriter()._monitor(SimpleNamespace(checkpoint_callback=checkpoint)) == ("val/loss", "max")


def test_the_wandb_run_config_holds_the_num_classes_linked_from_the_datamodule(monkeypatch):
    """``data.num_classes`` reaches the model through a link applied on instantiation, so it is not in the parsed
    config: the config written into the W&B run adds the model's value, and tables read from W&B see it."""
    from lightning.fabric.utilities.data import AttributeDict

    from lightning_methods import cli_lightning

    written = []
    monkeypatch.setattr(cli_lightning, "log_config", lambda loggers, config: written.append((loggers, config)))
    fake = SimpleNamespace(config={"model": {"class_path": "lightning_methods.ImageClassifier",
                                             "init_args": {"backbone": "resnet8"}}, "seed_everything": 0})
    trainer = SimpleNamespace(loggers=["wandb logger"])
    module = SimpleNamespace(hparams=AttributeDict(num_classes=10, backbone="resnet8"))
    cli_lightning.LoggerSaveConfigCallback.save_config(fake, trainer, module, "fit")
    ((loggers, config),) = written
    assert loggers == ["wandb logger"] and config["model"]["init_args"] == {"backbone": "resnet8", "num_classes": 10}


def test_predictions_are_named_after_their_checkpoint_only_beside_a_fit(tmp_path):
    """In a fit's run directory each checkpoint's predictions get their own files (``predictions-last.csv``); in a
    directory whose record is an evaluation's, or holds none, the file is the plain ``predictions.csv``."""
    import json

    from lightning_methods.callbacks.prediction_writer import PredictionWriter
    from lightning_methods.results.record import FORMAT

    writer, ckpt = PredictionWriter(), tmp_path / "checkpoints" / "last.ckpt"
    assert writer._stem(tmp_path, ckpt) == "predictions"
    (tmp_path / "results.json").write_text(json.dumps({"format": FORMAT, "command": "test"}))
    assert writer._stem(tmp_path, ckpt) == "predictions"
    (tmp_path / "results.json").write_text(json.dumps({"format": FORMAT, "command": "fit"}))
    assert writer._stem(tmp_path, ckpt) == "predictions-last" and writer._stem(tmp_path, None) == "predictions"


def test_a_resume_accepts_only_the_values_its_checkpoint_sets(tmp_path):
    """On resume LightningCLI copies the checkpoint's hyperparameters into the config, so a model setting that the
    module derived while training (HPN's bounds) may differ from the run's ``config.yaml`` when it equals the
    checkpoint's value; a model setting changed on the command line (another label smoothing) is still refused."""
    from lightning_methods.cli_runs import check_run_config
    from lightning_methods.runs import ConfigMismatchError

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    saved = {"model": {"class_path": "lightning_methods.ImageClassifier",
                       "init_args": {"label_smoothing": 0.0, "bounds": None}}, "trainer": {"max_epochs": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"hyper_parameters": {"label_smoothing": 0.0, "bounds": (1.0, 2.0)}}, last)
    derived = yaml.safe_load(yaml.safe_dump(saved))
    derived["model"]["init_args"]["bounds"] = [1.0, 2.0]
    check_run_config(run, derived, last)  # the checkpoint's own value: the same run
    changed = yaml.safe_load(yaml.safe_dump(derived))
    changed["model"]["init_args"]["label_smoothing"] = 0.1
    with pytest.raises(ConfigMismatchError, match=r"differ in: model\.init_args\.label_smoothing\. "):
        check_run_config(run, changed, last)
    with pytest.raises(ConfigMismatchError, match=r"model\.init_args\.bounds"):
        check_run_config(run, derived, None)  # not a resume: nothing is taken from a checkpoint
