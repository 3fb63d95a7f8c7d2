"""FedTGP: the server's gaps, margin and TGP training against HtFLlib's numbers, the loss's edge cases, the client side,
and a federation that runs, resumes and evaluates with the trained prototypes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fedfree_testing import assert_same_state, kill_and_resume, make_runner

from lightning_methods.federated import FedTGP
from lightning_methods.federated.algorithm import FederationInfo, Payload
from lightning_methods.federated.fedtgp import TrainableGlobalPrototypes, acl_loss, acl_margin, class_gaps, train_tgp

GOLDEN = json.loads((Path(__file__).parent / "golden_fedtgp.json").read_text())
#: HtFLlib's TGP parameter names, in order, and ours
NAMES = {"embedings.weight": "embedding.weight", "middle.0.0.weight": "hidden.weight", "middle.0.0.bias": "hidden.bias",
         "fc.weight": "fc.weight", "fc.bias": "fc.bias"}
EPS = torch.finfo(torch.float64).eps


def golden_uploads() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    protos = torch.tensor(GOLDEN["P"], dtype=torch.float64)
    masks = [torch.zeros(protos.shape[1], dtype=torch.bool) for _ in GOLDEN["have"]]
    for m, have in zip(masks, GOLDEN["have"]):
        m[have] = True
    return list(protos), masks


@pytest.mark.parametrize("case", ["max_gap", "threshold"])
def test_server_step_matches_htfllib(case):
    golden = GOLDEN[case]
    protos, masks = golden_uploads()
    gaps = class_gaps(protos, masks)
    # distances of means of 1-2 vectors of width 4: a few roundings of O(1) numbers
    torch.testing.assert_close(gaps, torch.tensor(golden["gap"], dtype=torch.float64), rtol=8 * EPS, atol=0)
    margin = acl_margin(gaps, golden["threshold"])
    assert margin == pytest.approx(min(golden["max_gap"], golden["threshold"]), rel=8 * EPS)

    tgp = TrainableGlobalPrototypes(5, 4).double()
    tgp.load_state_dict({NAMES[k]: torch.tensor(v, dtype=torch.float64) for k, v in GOLDEN["init"].items()})
    pairs = torch.cat([p[m] for p, m in zip(protos, masks)])
    labels = torch.cat([torch.nonzero(m).flatten() for m in masks])
    # one minibatch of every pair per epoch (HtFLlib shuffles it; the mean loss differs only in summation order)
    losses = train_tgp(tgp, pairs, labels, margin, lr=0.1, epochs=3, batch_size=len(labels),
                       generator=torch.Generator().manual_seed(0))
    # O(1) values through 3 SGD steps of lr 0.1: the summation-order differences (a few ulps) stay within 1e3 ulps
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(golden["losses"], dtype=torch.float64), rtol=1e3 * EPS, atol=0)
    tgp.eval()
    with torch.no_grad():
        torch.testing.assert_close(tgp(), torch.tensor(golden["global"], dtype=torch.float64), rtol=0, atol=1e3 * EPS)


def test_gaps_of_lonely_and_single_classes():
    protos = [torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0], [0.0, 1.0]])]
    mask = [torch.tensor([True, True, False, True])]
    gaps = class_gaps(protos, mask)
    # class 0: nearest is class 3 (1.0); class 1: class 3 (sqrt(9 + 9)); class 3: class 0; class 2 absent -> min
    torch.testing.assert_close(gaps, torch.tensor([1.0, 18 ** 0.5, 1.0, 1.0], dtype=torch.float64))
    assert acl_margin(gaps, 100.0) == pytest.approx(18 ** 0.5) and acl_margin(gaps, 2.0) == 2.0
    one = class_gaps(protos, [torch.tensor([False, True, False, False])])
    assert torch.isinf(one).all() and acl_margin(one, 7.0) == 7.0  # no pair: the threshold


def test_acl_loss_by_hand_and_finite_at_a_coincident_prototype():
    protos = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    glob = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1])
    loss = acl_loss(protos, labels, glob, margin=2.0)
    d = [[0.0, 5.0], [2 ** 0.5, 13 ** 0.5]]
    s0 = [-(d[0][0] + 2.0), -d[0][1]]
    s1 = [-d[1][0], -(d[1][1] + 2.0)]
    lse = lambda s: torch.logsumexp(torch.tensor(s, dtype=torch.float64), 0)  # noqa: E731
    expected = 0.5 * ((lse(s0) - s0[0]) + (lse(s1) - s1[1]))
    torch.testing.assert_close(loss.detach(), expected, rtol=4 * EPS, atol=0)
    loss.backward()  # sample 0 sits exactly on its class's prototype: the gradient stays finite
    assert torch.isfinite(glob.grad).all()


def test_aggregate_sends_every_class_and_round_trips(one_thread):
    algo = FedTGP(server_epochs=4, server_batch_size=3)
    algo.setup_server(FederationInfo(num_clients=2, num_classes=5, families=["a", "b"], feature_dim=4, seed=3))
    protos, masks = golden_uploads()
    uploads = {c: Payload({"protos": protos[c].float(), "mask": masks[c]}) for c in range(2)}
    before = algo.server_state_dict()
    metrics = algo.aggregate(1, uploads)
    assert metrics["server/prototypes"] == 5 and metrics["server/margin"] > 0
    sent = algo.download(0)
    assert sent.arrays["mask"].all() and sent.arrays["protos"].shape == (5, 4)  # absent class 4 too
    # the same state and round give the same result; another round's shuffling another one
    again = FedTGP(server_epochs=4, server_batch_size=3)
    again.setup_server(FederationInfo(num_clients=2, num_classes=5, families=["a", "b"], feature_dim=4, seed=3))
    again.load_server_state_dict(before)
    again.aggregate(1, uploads)
    assert_same_state(algo.server_state_dict(), again.server_state_dict())
    again.load_server_state_dict(before)
    again.aggregate(2, uploads)
    assert not torch.equal(again.protos, algo.protos)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="server_epochs=-1"):
        FedTGP(server_epochs=-1)
    with pytest.raises(ValueError, match="margin_threshold=-0.5"):
        FedTGP(margin_threshold=-0.5)


def test_federation_trains_evaluates_by_prototypes_and_resumes(tmp_path, one_thread, monkeypatch):
    full, resumed, calls = kill_and_resume(tmp_path, lambda: FedTGP(server_epochs=2), monkeypatch, rounds=2,
                                           kill_round=2)
    assert calls == [(2, 0), (2, 1)]
    assert_same_state(full.clients, resumed.clients)
    assert_same_state(full.algorithm.server_state_dict(), resumed.algorithm.server_state_dict())
    assert [h["client_acc"] for h in full.history] == [h["client_acc"] for h in resumed.history]
    for client in full.clients:  # every client holds a prototype of every class; none kept a local upload
        assert client["extra"]["mask"].all() and "local_protos" not in client["extra"]
    # evaluation is the nearest global prototype: recompute client 0's accuracy by hand
    runner = make_runner(tmp_path / "c", FedTGP(server_epochs=2), rounds=1, num_clients=2)
    runner.run()
    rt, client = runner.runtime, runner.clients[0]
    net = rt.net(0, client).eval()
    correct = total = 0
    with torch.no_grad():
        for batch in runner.data.client_loader(0, "test"):
            batch = runner.data.normalize_batch(batch)
            dist = torch.cdist(net.forward_features(batch["image"]), client["extra"]["protos"])
            correct += int((dist.argmin(1) == batch["target"]).sum())
            total += len(batch["target"])
    assert runner.history[-1]["client_acc"][0] == pytest.approx(correct / total)
