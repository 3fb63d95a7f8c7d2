"""Gaps found by mutation testing of the federated family, and the W&B directory of the ``fed`` command."""

from __future__ import annotations

import numpy as np
import pytest
from fedfree_testing import make_runner, tiny_config

from lightning_methods.federated.partition import pathological_shares


def test_pathological_shares_are_random_draws_in_the_pfedhn_range():
    """pFedHN's class shares: the holders of a class split it in proportions ``p_i / sum(p)`` with ``p_i`` drawn
    from U(0.4, 0.6), so with ``m`` holders every share lies in ``[0.4 / (0.4 + 0.6 (m - 1)), 0.6 / (0.6 + 0.4 (m -
    1))]`` and the shares are not all equal (equal shares, 1/m, would ignore the drawn proportions)."""
    rng = np.random.RandomState(0)
    shares = pathological_shares(num_clients=10, num_classes=10, classes_per_client=3, rng=rng)
    assert (np.count_nonzero(shares, axis=1) == 3).all()
    for k in range(10):
        held = shares[:, k][shares[:, k] > 0]
        m = len(held)
        assert m == 3 and held.sum() == pytest.approx(1.0, abs=4 * m * np.finfo(float).eps)
        # bounds on exact ratios; a few ulps of slack for the division
        low, high = 0.4 / (0.4 + 0.6 * (m - 1)), 0.6 / (0.6 + 0.4 * (m - 1))
        assert (held >= low - 1e-15).all() and (held <= high + 1e-15).all()
    nonzero = shares[shares > 0]
    assert np.ptp(nonzero) > 0.01  # 30 independent draws of U(0.4, 0.6) ratios: not one common value


def test_wandb_files_go_into_the_run_directory_not_the_working_directory(tmp_path, monkeypatch, one_thread):
    """A WandbLogger without ``save_dir`` (the run's ``logger`` section) writes its offline run under the
    algorithm's run directory (``run_dir/<algorithm>/wandb``), whatever the working directory (an explicit
    ``save_dir`` is kept: test_fedfree_round.py reads the W&B run there)."""
    from lightning_methods.federated.cli import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"project": "fed-wandb-dir", "offline": True}}
    config = tiny_config(tmp_path, {"class_path": "lightning_methods.federated.LocalOnly"},
                         federation__families=["fedavg_cnn"], logger=logger)
    run_dir = tmp_path / "elsewhere"
    run(["--config", str(config), "--run_dir", str(run_dir)])
    runs = list((run_dir / "local" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list(cwd.iterdir()) == []  # nothing in the working directory


def test_fedfree_pseudo_data_are_fresh_each_round_and_seeded(monkeypatch):
    """The server's Gaussian pseudo-data (Eqs. 3-5) come from a generator seeded by (seed, round, global layer):
    another round or another layer draws other pseudo-data (a generator seeded without the round would replay
    round 1's pseudo-data in every round), while the same (seed, round, layer) draws the same ones."""
    import torch

    from lightning_methods.federated import fedfree as fedfree_module
    from lightning_methods.federated.algorithm import ClientInfo, FederationInfo, build_net, cpu_state

    states: dict[tuple[int, str], list[torch.Tensor]] = {}
    current = {"round": 0}
    real = fedfree_module.distill_layer

    def spy(global_params, global_spec, teachers, **kwargs):
        key = (current["round"], global_spec.name)
        states.setdefault(key, []).append(kwargs["generator"].get_state().clone())
        return real(global_params, global_spec, teachers, **kwargs)

    info = FederationInfo(1, 10, ["fedavg_cnn"], seed=3)
    client = ClientInfo(client_id=0, family="fedavg_cnn", num_classes=10, num_examples=5)
    net = build_net("fedavg_cnn", info, 0)
    before = cpu_state(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    monkeypatch.setattr(fedfree_module, "distill_layer", spy)
    for _ in range(2):  # two fresh servers: the same draws
        algo = fedfree_module.FedFree(k=2, server_steps=0)  # the generators only
        algo.setup_server(info)
        upload = algo.upload(before, net, {}, client)
        for current["round"] in (1, 2):
            algo.aggregate(current["round"], {0: upload})
    layers = sorted({name for _, name in states})
    assert layers and all(len(v) == 2 and torch.equal(v[0], v[1]) for v in states.values())
    firsts = [states[(r, name)][0] for r in (1, 2) for name in layers]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])


def test_distillation_draws_fresh_pseudo_data_for_every_step():
    """Eqs. 3-5 with ``steps = 2`` on a Linear layer equal two hand-computed gradient steps, each on its own
    pseudo-batch drawn in turn from the seeded generator (not one batch reused). Float64 throughout: the gradient of
    ``mean_n ||r_n||^2`` (``sum_units``) is ``(2 / N) sum_n r_n x_n^T`` for W and ``(2 / N) sum_n r_n`` for b."""
    import torch

    from lightning_methods.federated.distill import distill_layer
    from lightning_methods.federated.layers import LayerSpec

    spec = LayerSpec(name="fc", kind="linear", index=0, count=1, in_features=3, out_features=2)
    g = torch.Generator().manual_seed(11)
    w_g, b_g = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    w_t, b_t = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    lr, n = 0.1, 4
    new, losses = distill_layer({"weight": w_g, "bias": b_g}, spec, [({"weight": w_t, "bias": b_t}, spec)], steps=2,
                                lr=lr, batch_size=n, generator=torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    w, b, expected_losses = w_g.clone(), b_g.clone(), []
    for _ in range(2):
        x = torch.randn(n, 3, generator=draws, dtype=torch.float64)
        r = x @ (w - w_t).T + (b - b_t)  # (n, 2) residuals
        expected_losses.append(float(r.pow(2).sum(1).mean()))
        w, b = w - lr * 2 / n * r.T @ x, b - lr * 2 / n * r.sum(0)
    # a handful of float64 operations on O(1) values: 1e-12 is thousands of ulps
    assert torch.allclose(new["weight"], w, rtol=0, atol=1e-12) and torch.allclose(new["bias"], b, rtol=0, atol=1e-12)
    assert losses == pytest.approx(expected_losses, rel=1e-12)


def test_the_last_round_is_evaluated_whatever_eval_every(tmp_path, one_thread):
    """``eval_every`` skips evaluations between rounds, but the last round is always evaluated (the final-round
    accuracy is FedFree's reported number)."""
    from lightning_methods.federated import LocalOnly

    runner = make_runner(tmp_path, LocalOnly(), families=["fedavg_cnn"], rounds=2, num_clients=2, eval_every=3)
    summary = runner.run()
    first, last = runner.history
    assert "acc/mean" not in first and "client_acc" not in first
    assert 0 <= last["acc/mean"] <= 1 and len(last["client_acc"]) == 2
    assert summary["final_mean"] == pytest.approx(last["acc/mean"]) and summary["rounds"] == 2
