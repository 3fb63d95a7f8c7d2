"""The tunnel-effect spec's defaults (shared/specs/tunnel_effect.md, "Hyperparameters"), read from the code's
signatures. The probe solver is a documented deviation: L-BFGS to convergence by default, the reimplementation's Adam
recipe (lr 1e-3, wd 0, batch 512, 30 epochs) as ``probe_solver: adam``."""

from __future__ import annotations

from dataclasses import fields

from lightning_methods.analysis.linear_probe import train_linear_probes
from lightning_methods.analysis.rank import numerical_rank
from lightning_methods.tunnel import ProbeSettings, tunnel_start

from helpers import signature_defaults


def test_code_defaults_are_the_spec_table():
    s = {f.name: f.default for f in fields(ProbeSettings)}
    assert {k: s[k] for k in ("probe_lr", "probe_weight_decay", "probe_batch_size", "probe_epochs", "pool_size",
                              "max_train_samples", "max_test_samples", "rank_rtol", "rank_max_columns", "rank_mode",
                              "tunnel_threshold", "include_head", "probe_solver")} == {
        "probe_lr": 1e-3, "probe_weight_decay": 0.0, "probe_batch_size": 512, "probe_epochs": 30, "pool_size": None,
        "max_train_samples": 10_000, "max_test_samples": None, "rank_rtol": 1e-3, "rank_max_columns": 8000,
        "rank_mode": "covariance", "tunnel_threshold": 0.95, "include_head": True, "probe_solver": "lbfgs"}
    probe = signature_defaults(train_linear_probes)
    assert (probe["epochs"], probe["batch_size"], probe["lr"], probe["weight_decay"]) == (30, 512, 1e-3, 0.0)
    rank = signature_defaults(numerical_rank)
    assert (rank["rtol"], rank["max_columns"], rank["mode"]) == (1e-3, 8000, "covariance")
    assert signature_defaults(tunnel_start)["threshold"] == 0.95
