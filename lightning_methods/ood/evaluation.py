"""The report stage of the EncMin2L pipeline: ECDF calibration and the two-level min gate over the scored RDMs, the
baselines on the same cached features, the eta^2 / Delta-mu diagnostics and the encoder subset they choose, then the
OpenOOD-style metrics of every detector (:mod:`.report`). Runs on rank zero."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_methods.ood.baselines import KNN, Mahalanobis, energy, msp
from lightning_methods.ood.cache import load_verified
from lightning_methods.ood.diagnostics import anova, delta_mu, select_encoders
from lightning_methods.ood.pvalues import GatePValues, TwoLevelMinGate
from lightning_methods.ood.report import Detector, evaluate, log_to_wandb, write_report
from lightning_methods.results.multistage import command_source
from lightning_methods.utils.wandb import finish_open_run, wandb_loggers


def _np(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy()


def load_scores(pipeline: Any, jobs: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """``{(encoder, variant): {set: logp}}``, checking that every job scored the same samples in the same order."""
    out, reference = {}, {}
    for encoder, variant in jobs:
        raw = load_verified(pipeline.run_dir / "scores" / f"{encoder}__{variant}.pt", "RDM scores")
        out[(encoder, variant)] = {name: r["logp"] for name, r in raw.items()}
        for name, r in raw.items():
            if name in reference and not torch.equal(reference[name], r["index"]):
                raise ValueError(f"scores of {encoder}/{variant} on {name} cover other samples than the other RDMs'")
            reference.setdefault(name, r["index"])
    return out


def gate_detectors(scores: dict, encoders: list[str], variants: list[str], sets: list[str], *, recalibration: str,
                   params: dict[tuple[str, str], int], name: str = "EncMin2L", levels: bool = True
                   ) -> tuple[list[Detector], dict[str, GatePValues]]:
    """The gate's detectors: ``L1[e]`` per encoder (when ``levels``) and the fused ``name`` row."""
    layout = lambda s: {e: {v: _np(scores[(e, v)][s]) for v in variants} for e in encoders}  # noqa: E731
    gate = TwoLevelMinGate.fit(layout("calib_1"), layout("calib_2"), recalibration)
    out = {s: gate.pvalues(layout(s)) for s in ["id_test", *sets]}
    total = sum(params[(e, v)] for e in encoders for v in variants)
    dets = [Detector(name, "fused", out["id_test"].level2, {s: out[s].level2 for s in sets}, total)]
    if levels:
        for e in encoders:
            dets.append(Detector(f"L1[{e}]", "level1", out["id_test"].level1[e], {s: out[s].level1[e] for s in sets},
                                 sum(params[(e, v)] for v in variants)))
    return dets, out


def baseline_detectors(pipeline: Any, splits: dict[str, torch.Tensor], sets: list[str]) -> list[Detector]:
    """MSP / energy (encoders with logits), Mahalanobis and kNN per encoder, fitted on the RDM training split."""
    base, dets = pipeline.base, []
    for spec in pipeline.encoders:
        e = spec.name
        test, ood = pipeline.features(e, "id_test"), {s: pipeline.features(e, s) for s in sets}
        if test.logits is not None:
            if base.msp:
                dets.append(Detector(f"MSP[{e}]", "baseline", _np(msp(test.logits)),
                                     {s: _np(msp(f.logits)) for s, f in ood.items()}))
            if base.energy:
                t = base.energy_temperature
                dets.append(Detector(f"Energy[{e}]", "baseline", _np(energy(test.logits, t)),
                                     {s: _np(energy(f.logits, t)) for s, f in ood.items()}))
        train = pipeline._split_set(e, "rdm_train", splits)
        if base.mahalanobis:
            maha = Mahalanobis(train.features, train.targets)
            dets.append(Detector(f"Mahalanobis[{e}]", "baseline", _np(maha(test.features)),
                                 {s: _np(maha(f.features)) for s, f in ood.items()}, maha.num_parameters))
        if base.knn_k:
            knn = KNN(train.features, min(base.knn_k, len(train.index)))
            dets.append(Detector(f"kNN[{e}]", "baseline", _np(knn(test.features)),
                                 {s: _np(knn(f.features)) for s, f in ood.items()}, knn.num_parameters))
    return dets


def diagnostics(pipeline: Any, scores: dict, variants: list[str]) -> tuple[list[dict[str, Any]], dict, dict]:
    """Rows per (encoder, variant) with eta^2, F and Delta-mu per corruption; encoder-level means."""
    diag, rows, eta_enc, dmu_enc = pipeline.diag, [], {}, {}
    for spec in pipeline.encoders:
        e = spec.name
        targets = pipeline.features(e, "id_test").targets.numpy()
        feat_anova = anova(_np(pipeline.features(e, "id_test").features), targets) if diag.eta2_on == "features" \
            else None
        etas, dmus = [], []
        for v in variants:
            clean = _np(scores[(e, v)]["id_test"])
            res = feat_anova or anova(clean, targets)
            row = {"encoder": e, "variant": v, "eta2": res["eta2"], "F": res["f"]}
            shifts = [delta_mu(clean, _np(scores[(e, v)][f"id_test_{c}"]), diag.standardize) for c in diag.corruptions]
            row.update({f"delta_mu[{c}]": d for c, d in zip(diag.corruptions, shifts)})
            row["delta_mu"] = float(np.mean(shifts)) if shifts else float("nan")
            rows.append(row)
            etas.append(res["eta2"])
            dmus.append(row["delta_mu"])
        eta_enc[e], dmu_enc[e] = float(np.mean(etas)), float(np.mean(dmus))
    return rows, eta_enc, dmu_enc


def environment() -> dict[str, Any]:
    """Where the report was computed: torch's version and thread count, the CPU, the library versions (float
    results on CPU depend on all of them)."""
    import os

    from lightning_methods.results.record import cpu_model, versions

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": versions()}


def build_report(pipeline: Any, jobs: list[tuple[str, str]]) -> dict[str, Any]:
    """Compute and write the report of a pipeline whose RDMs are all scored (rank zero only)."""
    encoders, variants = [e.name for e in pipeline.encoders], pipeline.variants
    sets = [s.name for s in pipeline.ood_cfgs]
    groups = {s.name: s.group for s in pipeline.ood_cfgs}
    splits = load_verified(pipeline.run_dir / "splits.pt", "calibration splits")
    scores = load_scores(pipeline, jobs)
    params = {(e, v): pipeline.staged.record(f"rdm/{e}/{v}")["params"] for e, v in jobs}
    recal = pipeline.fusion.recalibration
    detectors, _ = gate_detectors(scores, encoders, variants, sets, recalibration=recal, params=params)
    diag_rows, eta_enc, dmu_enc = diagnostics(pipeline, scores, variants)
    selected = select_encoders(eta_enc, dmu_enc, pipeline.diag.selection, pipeline.diag.k)
    if len(encoders) > 1 and set(selected) != set(encoders):
        subset, _ = gate_detectors(scores, selected, variants, sets, recalibration=recal, params=params,
                                   name=f"EncMin2L[{'+'.join(selected)}]", levels=False)
        detectors += subset
    for e in encoders:
        for v in variants:
            detectors.append(Detector(f"RDM[{e}/{v}]", "rdm", _np(scores[(e, v)]["id_test"]),
                                      {s: _np(scores[(e, v)][s]) for s in sets}, params[(e, v)]))
    mono = [job for job in jobs if job[0] == "monolithic"]
    for job in mono:
        detectors.append(Detector("Monolithic-RDM", "baseline", _np(scores[job]["id_test"]),
                                  {s: _np(scores[job][s]) for s in sets}, params[job]))
    detectors += baseline_detectors(pipeline, splits, sets)
    evaluate(detectors, groups, pipeline.fusion.fpr_convention)
    accuracy = {}
    for e in encoders:
        test = pipeline.features(e, "id_test")
        if test.logits is not None:
            accuracy[e] = float((test.logits.argmax(1) == test.targets).double().mean())
    extra = {"source": command_source(pipeline.config, pipeline.seed), "environment": environment(),
             "selected_encoders": selected, "eta2": eta_enc, "delta_mu": dmu_enc, "id_accuracy": accuracy,
             "splits": {k: len(v) for k, v in splits.items()},
             "parameter_ratio_monolithic_over_encmin2l": (params[mono[0]] / detectors[0].params) if mono else None}
    out_dir = pipeline.run_dir / "report"
    report = write_report(out_dir, detectors, groups, diag_rows, extra)
    rank_zero_info(f"[ood] EncMin2L report written to {out_dir}")
    trainer = pipeline.make_trainer("report")
    for logger in wandb_loggers(trainer.loggers):
        log_to_wandb(logger.experiment, report, diag_rows)
        finish_open_run()
    files = sorted(str(p.relative_to(pipeline.run_dir)) for p in out_dir.iterdir())
    return {"status": "done", "table": report["table"], "summary": report["summary"], "files": files,
            "selected_encoders": selected, "report_dir": str(out_dir)}
