"""The ``lightning-methods-ood`` pipeline end to end on the shipped digits demo config (shrunk by command-line
overrides): every stage, the report files, resume without recomputation, a resumed RDM fit equal to an uninterrupted
one, cache reuse across runs and its invalidation, refused config changes and bad input. Every configs/ood YAML is
parsed here (tests/ood/overrides_ood.py points tests/test_configs.py at this file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_methods.ood import pipeline as pipeline_module
from lightning_methods.ood.cli import build_parser, run_ood
from lightning_methods.ood.pipeline import EncMin2LPipeline
from lightning_methods.runs import ConfigMismatchError

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs" / "ood").glob("*.yaml")
                 if "encoders:" in p.read_text())  # pipeline configs (rdm_features.yaml is a fit config)
DEMO = next(p for p in CONFIGS if p.name == "digits_demo.yaml")
TINY = [
    "--rdm.module", json.dumps({"net": {"width": 16, "bottleneck": 16, "num_blocks": 1, "time_embed_dim": 8},
                                "training": {"warmup_steps": 2}, "likelihood": {"rtol": 1e-3, "atol": 1e-3}}),
    "--rdm.max_epochs", "2", "--rdm.batch_size", "128", "--rdm.ema_decay", "0.9", "--pca_dim", "16",
    "--encoders", json.dumps([{"name": "cnn", "backbone": "resnet8", "train": {"max_epochs": 1, "batch_size": 64}},
                              {"name": "rand_timm", "timm": "resnet10t", "pretrained": False, "input_size": 32,
                               "seed": 1}]),
    "--diagnostics.corruptions", '["gaussian_noise"]', "--baselines.knn_k", "5", "--trainer.logger", "false",
]
#: the first run logs to offline W&B like the shipped demo (the others skip its start-up time)
WANDB = ["--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.WandbLogger",
                                         "init_args": {"project": "ood-test", "offline": True}})]


def _args(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(DEMO), "--run_dir", str(run_dir), "--cache_dir", str(cache), *TINY, *extra]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ood_pipeline")
    result = run_ood(_args(root / "run", root / "cache", *WANDB))
    return root, result


def test_every_ood_config_parses_and_builds():
    assert {p.name for p in CONFIGS} >= {"digits_demo.yaml", "cifar100_encmin2l.yaml"}
    parser = build_parser()
    for path in CONFIGS:
        config = parser.parse_args(["--config", str(path)])
        pipe = EncMin2LPipeline(parser, config)
        assert pipe.encoders and pipe.ood_cfgs and pipe.variants, path.name


def test_demo_runs_every_stage_and_writes_the_report(demo_run):
    root, result = demo_run
    assert result["status"] == "done"
    report = root / "run" / "report"
    for name in ("metrics.csv", "summary.csv", "diagnostics.csv", "results.json", "table.txt", "EncMin2L.png",
                 "L1_cnn.png"):
        assert (report / name).is_file(), name
    results = json.loads((report / "results.json").read_text())
    names = {d["name"] for d in results["detectors"]}
    assert {"EncMin2L", "L1[cnn]", "L1[rand_timm]", "RDM[cnn/l2]", "Monolithic-RDM", "MSP[cnn]", "Energy[cnn]",
            "Mahalanobis[rand_timm]", "kNN[cnn]"} <= names
    assert "MSP[rand_timm]" not in names  # no logits for a timm encoder
    fused = next(d for d in results["detectors"] if d["name"] == "EncMin2L")
    assert set(fused["means"]) == {"near", "far", "covariate"}
    assert fused["means"]["far"]["auroc"] > 0.9  # measured 0.99 with these tiny RDMs (photo patches vs digits)
    one_rdm = next(d for d in results["detectors"] if d["name"] == "RDM[cnn/standardize]")["params"]
    assert fused["params"] == 4 * one_rdm  # 2 encoders x 2 variants
    assert results["parameter_ratio_monolithic_over_encmin2l"] > 0
    assert len(results["diagnostics"]) == 4 and 0 <= results["eta2"]["cnn"] <= 1
    assert set(results["splits"]) == {"rdm_train", "calib_1", "calib_2"}
    header = (report / "metrics.csv").read_text().splitlines()[0]
    assert header == "detector,kind,params,dataset,group,auroc,fpr95,aupr_in,aupr_out"
    state = json.loads((root / "run" / "state.json").read_text())
    assert {"encoder/cnn", "embed/cnn", "splits", "rdm/cnn/standardize", "score/monolithic/standardize",
            "report"} <= set(state["stages"])
    union = next(d for d in results["detectors"] if d["name"] == "EncMin2L")["metrics"]["union"]
    assert 0.5 < union["auroc"] <= 1  # ID against every OOD set pooled
    env = results["environment"]
    assert env["threads"] == torch.get_num_threads() and env["torch"] == torch.__version__ and "cpu" in env
    assert results["source"]["seed"] == 0 and results["source"]["config"][-1].endswith("digits_demo.yaml")
    # one offline W&B run per stage in the run directory; the report's holds the ROC pictures
    from helpers import read_wandb_records

    report_run = state["wandb_ids"]["report"]
    run_file = next((root / "run" / "wandb").glob(f"offline-run-*-{report_run}/run-{report_run}.wandb"))
    assert "ood/plots/EncMin2L" in " ".join(str(r) for r in read_wandb_records(run_file))  # the ROC picture


def test_rerun_recomputes_nothing_and_config_changes_are_refused(demo_run, monkeypatch):
    root, result = demo_run

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished stage was recomputed")

    for name in ("embed", "fit_rdm", "score_sets", "train_encoder", "build_report"):
        monkeypatch.setattr(pipeline_module, name, forbidden)
    again = run_ood(_args(root / "run", root / "cache"))
    assert again["table"] == result["table"]
    with pytest.raises(ConfigMismatchError, match="seed"):
        run_ood(_args(root / "run", root / "cache", "--seed", "1"))


def test_cache_is_shared_between_runs_and_invalidated_by_a_changed_encoder(demo_run, monkeypatch):
    root, _ = demo_run
    calls = []
    real = pipeline_module.embed

    def counting(encoder, images, *args, **kwargs):
        calls.append(encoder.preprocess["input_size"])
        return real(encoder, images, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "embed", counting)
    out = run_ood(_args(root / "run2", root / "cache", "--stop_after", "embed"))
    assert out["status"] == "paused" and calls == []  # every entry reused (same encoder weights and images)
    encoders = json.loads(TINY[TINY.index("--encoders") + 1])
    encoders[1]["input_size"] = 40
    run_ood(_args(root / "run3", root / "cache", "--stop_after", "embed", "--encoders", json.dumps(encoders)))
    assert calls and set(calls) == {40}  # only the changed encoder was embedded again


def test_interrupted_rdm_fit_resumes_to_the_same_weights(demo_run, monkeypatch):
    import lightning as L

    root, _ = demo_run

    class Interrupt(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    real, interrupted = EncMin2LPipeline.make_trainer, []

    def make_trainer(self, stage=None, **kwargs):
        if stage == "rdm-cnn-standardize" and not interrupted:  # only the first fit of this RDM
            interrupted.append(stage)
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), Interrupt()]
        return real(self, stage, **kwargs)

    monkeypatch.setattr(EncMin2LPipeline, "make_trainer", make_trainer)
    args = _args(root / "run4", root / "cache", "--stop_after", "score")
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully on Ctrl-C and exits
        run_ood(args)
    state = json.loads((root / "run4" / "state.json").read_text())
    assert "embed/cnn" in state["stages"] and "rdm/cnn/standardize" not in state["stages"]
    assert (root / "run4" / "rdm" / "cnn__standardize" / "last.ckpt").is_file()
    assert run_ood(args)["status"] == "paused"
    resumed = torch.load(root / "run4" / "rdm" / "cnn__standardize" / "rdm.pt", weights_only=True)["state_dict"]
    reference = torch.load(root / "run" / "rdm" / "cnn__standardize" / "rdm.pt", weights_only=True)["state_dict"]
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_calibration_overlapping_the_rdm_training_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="overlap the RDM training split"):
        run_ood(_args(tmp_path / "run", tmp_path / "cache", "--id.calib_split", "train", "--stop_after", "score"))


FAR_BOUND, COVARIATE_BOUND = 0.9, 0.9  # measured (seeds 0-2): EncMin2L far 97.7 +- 2.1, covariate 97.6 +- 2.0


@pytest.mark.slow
def test_full_digits_demo(tmp_path):
    """The shipped demo unchanged (about 2 min of CPU); the paper's direction: the fused detector above each encoder
    alone on the union of shifts (measured in seeds 0, 1, 2 by 1.8, 2.1 and 5.8 AUROC points)."""
    result = run_ood(["--config", str(DEMO), "--run_dir", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    det = {d["name"]: d for d in results["detectors"]}
    fused = det["EncMin2L"]
    assert result["status"] == "done"
    assert fused["means"]["far"]["auroc"] > FAR_BOUND and fused["means"]["covariate"]["auroc"] > COVARIATE_BOUND
    union = fused["metrics"]["union"]["auroc"]
    assert union > det["L1[cnn]"]["metrics"]["union"]["auroc"] and union > det["L1[rand_timm]"]["metrics"]["union"][
        "auroc"]


def test_corrupt_or_deleted_cache_entries_and_stage_outputs(demo_run, monkeypatch):
    """Issue 22 item 4: a flipped byte or a truncated cache entry stops with a message naming the file; deleting it
    or ``--cache_policy refresh`` recomputes it even though the embed stage is recorded finished; the same for the
    stage outputs (splits, RDMs, scores)."""
    import shutil

    from lightning_methods.ood.cache import CorruptFileError

    root, result = demo_run
    run, cache = root / "run5", root / "cache5"
    shutil.copytree(root / "run", run)
    shutil.copytree(root / "cache", cache)
    calls = []
    real = pipeline_module.embed
    monkeypatch.setattr(pipeline_module, "embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    entry = cache / "cnn" / "id_test.pt"
    good = entry.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0x01
    entry.write_bytes(bytes(raw))
    # a run that needs the entry stops, naming it and the two ways out
    with pytest.raises(CorruptFileError, match=rf"{entry}.*--cache_policy refresh.*delete the file"):
        run_ood(_args(root / "run6", cache, "--stop_after", "embed"))
    entry.write_bytes(good[:100])  # truncated
    with pytest.raises(CorruptFileError, match="id_test.pt is corrupt"):
        run_ood(_args(root / "run6", cache, "--stop_after", "embed"))
    # refresh recomputes every entry of a finished run; the same features give the same report
    again = run_ood(_args(run, cache, "--cache_policy", "refresh"))
    assert again["table"] == result["table"] and len(calls) == len(list(cache.glob("*/*.pt")))
    assert entry.read_bytes() == good
    # a deleted entry is recomputed alone under the default policy
    calls.clear()
    entry.unlink()
    assert run_ood(_args(run, cache))["table"] == result["table"] and len(calls) == 1
    # stage outputs: a flipped byte in a score file stops the report stage, naming the file ...
    scores = run / "scores" / "cnn__standardize.pt"
    raw = bytearray(scores.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    scores.write_bytes(bytes(raw))
    (run / "report" / "table.txt").unlink()
    with pytest.raises(CorruptFileError, match=rf"RDM scores {scores} is corrupt"):
        run_ood(_args(run, cache))
    # ... and refresh scores again; a deleted RDM is refitted (from its finished last.ckpt) to the same weights
    assert run_ood(_args(run, cache, "--cache_policy", "refresh"))["table"] == result["table"]
    package = run / "rdm" / "cnn__standardize" / "rdm.pt"
    before = torch.load(package, weights_only=True)["state_dict"]
    package.unlink()
    (run / "splits.pt").unlink()
    assert run_ood(_args(run, cache))["table"] == result["table"]
    after = torch.load(package, weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_grid_runs_the_pipeline_over_seeds_and_table_reads_it(demo_run, tmp_path):
    """`lightning-methods grid --command ood` + `table`: the demo numbers' route (one seed here, the cache shared)."""
    from lightning_methods.results import grid, table

    root, _ = demo_run
    args = ["--command", "ood", "--config", str(DEMO), "--seeds", "3", "--grid_dir", str(tmp_path / "grid"), "--",
            "--cache_dir", str(root / "cache"), *TINY]
    records = grid.main(args)
    run_dir = tmp_path / "grid" / "digits_demo" / "seed3"
    assert (run_dir / "run.yaml").read_text().startswith("# command: ood\n")
    state = json.loads((run_dir / "ood" / "state.json").read_text())
    assert "report" in state["stages"] and (run_dir / "ood" / "config.yaml").is_file()
    report = json.loads((run_dir / "ood" / "report" / "results.json").read_text())
    fused = next(d for d in report["detectors"] if d["name"] == "EncMin2L")
    assert records[0]["metrics"]["ood/EncMin2L/union/auroc"] == pytest.approx(100 * fused["metrics"]["union"]["auroc"])
    assert grid.main(args)[0]["metrics"] == records[0]["metrics"]  # finished: skipped, same record
    out = table.main([str(tmp_path / "grid"), "--metrics", "ood/EncMin2L/union/auroc", "--no_plot", "--output",
                      str(tmp_path / "table")])
    assert "| `digits_demo` | 1 |" in out.markdown
    assert f"{100 * fused['metrics']['union']['auroc']:.2f}" in out.markdown


def test_a_moved_run_directory_keeps_its_trained_encoder(tmp_path, monkeypatch):
    """The encoder stage records its checkpoint relative to the run directory: after the run directory is moved,
    a rerun neither trains the encoder again nor reads the old location; it embeds with the moved checkpoint. A
    record of an older run (an absolute path) still works: as it is while the file is there, and, once the file
    was moved with its run directory, from the stage's own place in the moved directory."""
    import shutil

    small = ["--encoders", json.dumps([{"name": "cnn", "backbone": "resnet8", "train": {"max_epochs": 1}}]),
             "--ood", json.dumps([{"name": "digits59", "split": "train", "classes": [5, 6], "max_samples": 20}]),
             "--diagnostics.corruptions", "[]", "--stop_after", "embed"]

    def args(run: Path) -> list[str]:
        return _args(run, tmp_path / "cache", *small)

    old, moved = tmp_path / "old", tmp_path / "moved"
    assert run_ood(args(old))["stage"] == "embed"
    state = json.loads((old / "state.json").read_text())
    assert state["stages"]["encoder/cnn"] == {"checkpoint": "encoder/cnn/last.ckpt"}
    shutil.move(old, moved)

    def forbidden(*args, **kwargs):
        raise AssertionError("the encoder was trained again")

    used = []
    real = pipeline_module.build_encoder
    monkeypatch.setattr(pipeline_module, "train_encoder", forbidden)
    monkeypatch.setattr(pipeline_module, "build_encoder", lambda spec, *a, **k: used.append(spec.checkpoint)
                        or real(spec, *a, **k))
    entry = tmp_path / "cache" / "cnn" / "id_test.pt"

    def rerun() -> None:
        entry.unlink()  # one missing cache entry: the embed stage rebuilds the encoder from its checkpoint
        assert run_ood(args(moved))["stage"] == "embed"

    rerun()
    checkpoint = moved / "encoder" / "cnn" / "last.ckpt"
    assert used == [str(checkpoint)] and not old.exists()
    # older records: an absolute path that exists is used as it is; one that is gone falls back to the moved file
    elsewhere = tmp_path / "elsewhere.ckpt"
    shutil.copy(checkpoint, elsewhere)
    shutil.copy(checkpoint.with_name(checkpoint.name + ".sha256"), elsewhere.with_name(elsewhere.name + ".sha256"))
    for recorded, expected in ((elsewhere, elsewhere), (old / "encoder" / "cnn" / "last.ckpt", checkpoint)):
        state = json.loads((moved / "state.json").read_text())
        state["stages"]["encoder/cnn"] = {"checkpoint": str(recorded)}
        (moved / "state.json").write_text(json.dumps(state))
        used.clear()
        rerun()
        assert used == [str(expected)]
