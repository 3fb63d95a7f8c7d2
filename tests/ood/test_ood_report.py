"""The report: OpenOOD table rows, CSV / JSON / PNG files, the W&B entries, and the per-stage W&B runs of the
pipeline's Trainers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.loggers import WandbLogger

from lightning_methods.ood.cli import build_parser
from lightning_methods.ood.pipeline import EncMin2LPipeline
from lightning_methods.ood.report import Detector, evaluate, log_to_wandb, write_report
from lightning_methods.runs import StagedRun

DEMO = Path(__file__).resolve().parents[2] / "configs" / "ood" / "digits_demo.yaml"


def _detectors():
    rng = np.random.default_rng(0)
    ok = Detector("EncMin2L", "fused", rng.uniform(0.2, 1, 50), {"a": rng.uniform(0, 0.15, 40),
                                                                  "b": rng.uniform(0, 1, 30)}, params=10)
    base = Detector("kNN[e]", "baseline", rng.normal(1, 1, 50), {"a": rng.normal(0, 1, 40), "b": rng.normal(0, 1, 30)})
    return [ok, base]


def test_rows_files_and_figures(tmp_path):
    dets = _detectors()
    groups = {"a": "near", "b": "far"}
    evaluate(dets, groups)
    assert dets[0].metrics["a"]["auroc"] == 1.0 and dets[0].means["near"] == dets[0].metrics["a"]
    out = write_report(tmp_path, dets, groups, [{"encoder": "e", "variant": "raw", "eta2": 0.5}], {"note": 1})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["dataset"] for r in rows[:5]] == ["a", "b", "union", "near_mean", "far_mean"]
    assert float(rows[0]["auroc"]) == 100.0 and rows[3]["group"] == "near" and rows[2]["group"] == "union"
    from sklearn.metrics import roc_auc_score  # the union: ID against both OOD sets pooled, ID positive

    pooled = np.concatenate([dets[1].ood_conf["a"], dets[1].ood_conf["b"]])
    truth = roc_auc_score(np.r_[np.ones(50), np.zeros(70)], np.r_[dets[1].id_conf, pooled])
    assert dets[1].metrics["union"]["auroc"] == pytest.approx(truth, abs=1e-12)
    # the same ID set against each: the pooled AUROC is the size-weighted mean of the per-set AUROCs
    union = dets[0].metrics["union"]["auroc"]
    assert union == pytest.approx((40 * dets[0].metrics["a"]["auroc"] + 30 * dets[0].metrics["b"]["auroc"]) / 70)
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert summary[0]["near/AUROC"] == "100.0" and summary[1]["detector"] == "kNN[e]"
    assert json.loads((tmp_path / "results.json").read_text())["note"] == 1
    assert (tmp_path / "EncMin2L.png").stat().st_size > 1000 and "kNN[e]" not in out["images"]
    assert out["table"].splitlines()[0].startswith("detector")

    class Recorder:  # the W&B run API used: log() and summary
        def __init__(self):
            self.logged, self.summary = {}, {}

        def log(self, data):
            self.logged.update(data)

    rec = Recorder()
    log_to_wandb(rec, out, [{"encoder": "e", "eta2": 0.5}])
    assert {"ood/metrics", "ood/summary", "ood/diagnostics", "ood/plots/EncMin2L"} <= set(rec.logged)
    assert rec.summary["ood/EncMin2L/near_mean/auroc"] == 100.0


def test_fit_stages_get_their_own_wandb_runs(tmp_path):
    parser = build_parser()
    config = parser.parse_args(["--config", str(DEMO), "--run_dir", str(tmp_path / "run"), "--trainer.logger",
                                json.dumps({"class_path": "lightning.pytorch.loggers.WandbLogger",
                                            "init_args": {"project": "p", "offline": True,
                                                          "save_dir": str(tmp_path)}})])
    pipe = EncMin2LPipeline(parser, config)
    with StagedRun(pipe.run_dir, "ood", pipe.fingerprint()) as run:
        pipe.staged = run
        trainer = pipe.make_trainer("rdm-cnn-raw", max_epochs=1)
        (logger,) = trainer.loggers
        assert isinstance(logger, WandbLogger) and logger._wandb_init["name"] == "run-rdm-cnn-raw"
        assert logger._wandb_init["group"] == "run" and logger._wandb_init["id"] == run.wandb_id("rdm-cnn-raw")
        assert pipe.make_trainer(None).loggers == []  # predict stages log nothing
    with pytest.raises(ValueError, match="at least one encoder"):
        EncMin2LPipeline(parser, parser.parse_args(["--config", str(DEMO), "--encoders", "[]"]))
