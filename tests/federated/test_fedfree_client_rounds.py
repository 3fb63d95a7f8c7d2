"""The client-round machinery: one reused Trainer gives bit-identical rounds to a fresh Trainer per client-round (and
to the golden digests recorded with the previous implementation), and a diverging client stops the run with the
package's non-finite error before the round is recorded."""

from __future__ import annotations

import json

import pytest
from golden_round import CASES, GOLDEN, environment, run_case

from lightning_methods.callbacks.nonfinite_guard import NonFiniteTrainingError
from lightning_methods.federated.local import ClientRuntime


@pytest.mark.parametrize("name", sorted(CASES))
def test_rounds_equal_the_golden_of_the_previous_implementation(name, tmp_path, one_thread):
    golden = json.loads(GOLDEN.read_text())
    if golden["environment"] != environment():  # bit-exact digests hold for one CPU kernel set and torch version
        pytest.skip(f"golden recorded on {golden['environment']}, this is {environment()}; the reuse-vs-fresh test "
                    "below checks the same property on any machine")
    assert run_case(tmp_path, name) == golden["cases"][name]


@pytest.mark.parametrize("name", ["fedfree_momentum", "fedkd"])
def test_reused_trainer_equals_a_fresh_trainer_per_client_round(name, tmp_path, one_thread, monkeypatch):
    reused = run_case(tmp_path / "reused", name)
    init = ClientRuntime.__init__
    monkeypatch.setattr(ClientRuntime, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "reuse_trainer": False}))
    fresh = run_case(tmp_path / "fresh", name)
    assert reused == fresh
    assert len(reused["client_acc"]) == 2  # two rounds: the second fit of each client ran on the reused Trainer


def _no_round_recorded(run_dir):
    assert run_dir.is_dir() and not list(run_dir.rglob("round*.pt")) and not list(run_dir.rglob("history.csv"))
    for state in run_dir.rglob("state.json"):
        assert not any(s.startswith("round") for s in json.loads(state.read_text()).get("stages", {}))


def test_diverging_client_stops_with_the_nonfinite_error_and_records_no_round(tmp_path, one_thread):
    from fedfree_testing import TINY_TRAINER, tiny_config

    from lightning_methods.federated.cli import run

    # lr 1e6 (issue 22): the weights blow up by ~1e6 per step; within a few steps the loss overflows to inf / NaN
    path = tiny_config(tmp_path, federation__lr=1e6, trainer={**TINY_TRAINER, "limit_train_batches": 8})
    diverged = r"federated client 0 \(\w+\) diverged in round 1 .*lr=1e\+06"
    with pytest.raises(NonFiniteTrainingError, match=diverged) as err:
        run(["--config", str(path)])
    assert "Lower --federation.lr" in str(err.value) and "--model.init_args" not in str(err.value)  # fed's options
    _no_round_recorded(tmp_path / "run" / "fedfree")


def test_server_distillation_refuses_non_finite_layers():
    import torch

    from lightning_methods.federated.distill import distill_layer
    from lightning_methods.federated.layers import LayerSpec

    spec = LayerSpec(name="fc", kind="linear", index=0, count=1, in_features=4, out_features=3)
    good = {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}
    bad = {"weight": torch.full((3, 4), float("nan")), "bias": torch.zeros(3)}
    with pytest.raises(NonFiniteTrainingError, match="global layer 'fc': the loss"):
        distill_layer(good, spec, [(bad, spec)], steps=1)
    # a finite teacher with an absurd server rate: |W - W_teacher| grows by |1 - 2 lr| per step until it overflows
    with pytest.raises(NonFiniteTrainingError, match="global layer 'fc'"):
        distill_layer({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, spec, [(good, spec)], steps=20, lr=1e10)
    new, losses = distill_layer(good, spec, [(good, spec)], steps=2, lr=0.01)  # finite: no error, fixed point
    assert losses == [0.0, 0.0] and torch.equal(new["weight"], good["weight"])


def test_non_finite_server_state_stops_before_the_round_is_recorded(tmp_path, one_thread):
    import torch
    from fedfree_testing import make_runner

    from lightning_methods.federated import FedFree

    class BrokenServer(FedFree):
        def aggregate(self, round, uploads):
            metrics = super().aggregate(round, uploads)
            key = next(iter(self.global_state))
            self.global_state[key] = torch.full_like(self.global_state[key], float("inf"))
            return metrics

    with pytest.raises(NonFiniteTrainingError, match=r"round 1: server aggregation: NaN or inf in state\.global_state"):
        make_runner(tmp_path, BrokenServer(k=2, pseudo_batch_size=16), num_clients=2).run()
    _no_round_recorded(tmp_path / "run" / "fedfree")


def test_client_round_guard_sees_a_non_finite_buffer_with_a_finite_loss():
    """A BatchNorm statistic can overflow while the training loss stays finite (batch statistics are used in
    training): the end-of-client-round check looks at every parameter and buffer."""
    import torch

    from lightning_methods.federated.client import FedClientModule
    from lightning_methods.federated.local import ClientRoundGuard
    from lightning_methods.models.fed_clients import create_client_net

    module = FedClientModule(create_client_net("fed_resnet8", 10), num_classes=10)
    guard = ClientRoundGuard()
    assert not bool(guard._params_bad(module))
    bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0] = float("inf")
    assert bool(guard._params_bad(module))
    bn.running_var[0] = 1.0
    next(module.parameters()).data.view(-1)[3] = float("nan")
    assert bool(guard._params_bad(module))
