"""The baselines' server and client math: FedAvg / FedProx, FedProto, FedGH, FedKD (HtFLlib golden SVD numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.federated import FedAvg, FederationInfo, FedGH, FedKD, FedProto, Payload
from lightning_methods.federated.baselines import FedProxClientModule
from lightning_methods.federated.fedgh import train_head
from lightning_methods.federated.fedkd import FedKDClientModule, compress_state, recover_state, svd_compress
from lightning_methods.federated.fedproto import FedProtoClientModule, aggregate_prototypes, prototype_scores
from lightning_methods.models.fed_clients import create_client_net


def test_fedavg_weighted_average_and_one_family():
    algo = FedAvg()
    algo.setup_server(FederationInfo(2, 10, ["fedavg_cnn", "fedavg_cnn"], seed=0))
    keys = list(algo.global_state)
    a = {k: torch.full_like(v, 1.0) for k, v in algo.global_state.items()}
    b = {k: torch.full_like(v, 4.0) for k, v in algo.global_state.items()}
    algo.aggregate(1, {0: Payload(a, {"num_examples": 30}), 1: Payload(b, {"num_examples": 10})})
    assert all(torch.allclose(algo.global_state[k], torch.full_like(a[k], 1.75)) for k in keys)
    assert torch.equal(algo.download(1).arrays[keys[0]], algo.global_state[keys[0]])
    with pytest.raises(ValueError, match="needs one client family"):
        FedAvg().setup_server(FederationInfo(2, 10, ["fed_cnn", "fed_resnet8"]))


def test_fedprox_term_gradient_is_mu_times_the_drift():
    net = create_client_net("fedavg_cnn", 10)
    module = FedProxClientModule(net, mu=0.3, num_classes=10)
    module.anchor = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)
    reg = module.regularizer({}, torch.zeros(1), torch.zeros(1))
    n = sum(p.numel() for p in net.parameters())
    assert float(reg) == pytest.approx(0.5 * 0.3 * 0.25 * n, rel=1e-5)
    reg.backward()
    assert all(torch.allclose(p.grad, torch.full_like(p, 0.3 * 0.5)) for p in net.parameters())


def test_fedproto_aggregation_scores_and_local_loss():
    protos = [torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 1.0], [0.0, 0.0], [5.0, 5.0]])]
    masks = [torch.tensor([True, True, False]), torch.tensor([True, False, False])]
    mean, mask = aggregate_prototypes(protos, masks)
    assert mean[0].tolist() == [2.0, 1.0] and mean[1].tolist() == [2.0, 0.0] and mask.tolist() == [True, True, False]
    scores = prototype_scores(torch.tensor([[2.0, 0.5]]), mean, mask)
    assert scores[0, :2].tolist() == pytest.approx([-0.125, -0.125]) and scores[0, 2] == float("-inf")

    module = FedProtoClientModule(create_client_net("fedavg_cnn", 3), lamda=10.0, num_classes=3)
    module.global_protos, module.global_mask = torch.randn(3, 512), torch.tensor([True, False, True])
    feats, y = torch.randn(4, 512), torch.tensor([0, 1, 2, 2])
    reg = module.regularizer({"target": y}, feats, None)
    # HtFLlib: lamda * MSELoss(proto_new, rep) with proto_new = global proto, or the detached feature without one
    proto_new = feats.clone()
    proto_new[[0, 2, 3]] = module.global_protos[[0, 2, 2]]
    assert float(reg.mean()) == pytest.approx(10.0 * float(F.mse_loss(proto_new, feats)), rel=1e-6)
    module.observe({"target": y}, feats)
    assert torch.allclose(module.proto_sums[2].float() / 2, feats[2:].mean(0), atol=1e-6)


def test_fedproto_server_round_trip():
    algo = FedProto()
    algo.setup_server(FederationInfo(2, 3, ["fed_cnn"] * 2))
    up = {c: Payload({"protos": torch.full((3, 512), float(c)), "mask": torch.tensor([True, c == 1, False])})
          for c in (0, 1)}
    assert algo.aggregate(1, up)["server/classes_with_prototype"] == 2
    extra = {}
    algo.apply_download(None, extra, algo.download(0), None)
    assert extra["protos"][0, 0] == 0.5 and extra["protos"][1, 0] == 1.0


def test_fedgh_head_training_learns_separable_prototypes():
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    protos = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]]).repeat(5, 1)
    labels = torch.tensor([0, 1]).repeat(5)
    losses = train_head(head, protos, labels, lr=0.5, epochs=20, batch_size=4, generator=torch.Generator())
    assert losses[-1] < 0.1 * losses[0] and (head(protos).argmax(1) == labels).all()
    algo = FedGH()
    algo.setup_server(FederationInfo(2, 10, ["fedavg_cnn"] * 2))
    net = create_client_net("fedavg_cnn", 10)
    algo.apply_download(net, {}, algo.initial_download(0), None)
    assert torch.equal(net.head.weight, algo.head.weight)


# HtFLlib ``decomposition`` / ``recover`` (clientkd.py) in float64 on RandomState(0) draws of shapes (6, 5), (4, 3, 3,
# 3), (6,) and (1, 4): kept rank and sum / first entry of each recovered tensor (numbers from the official code).
SVD_GOLDEN = {
    0.5: {"lin": (2, 11.343396589684653, 1.6282117268031264), "conv": (1, 7.183519270901945, 0.4217821028556581)},
    0.9: {"lin": (3, 13.762849541391528, 1.620682359907389), "conv": (2, 4.719101827020742, 0.08769068995434327)},
    0.95: {"lin": (4, 13.290483989719569, 1.745525544198413)},
}


def test_fedkd_svd_compression_matches_htfllib():
    rng = np.random.RandomState(0)
    params = {k: torch.from_numpy(rng.randn(*s)) for k, s in
              [("lin", (6, 5)), ("conv", (4, 3, 3, 3)), ("bias", (6,)), ("row", (1, 4))]}
    for energy, golden in SVD_GOLDEN.items():
        for name, (rank, total, first) in golden.items():
            parts = svd_compress(params[name], energy)
            rec = recover_state({f"{name}::{k}": v for k, v in parts.items()})[name]
            assert parts["s"].shape[-1] == rank
            assert float(rec.sum()) == pytest.approx(total, abs=1e-12) and float(rec.flatten()[0]) == pytest.approx(
                first, abs=1e-12)
        assert set(svd_compress(params["bias"], energy)) == {""} and set(svd_compress(params["row"], energy)) == {""}
    # HtFLlib returns a zero tensor when the top r - 1 values miss the energy (conv at 0.95); we keep full rank
    full = svd_compress(params["conv"], 0.95)
    assert full["s"].shape[-1] == 3 and torch.allclose(recover_state({f"c::{k}": v for k, v in full.items()})["c"],
                                                        params["conv"])
    state = compress_state(params, 1.0)
    assert all(torch.allclose(v, params[k]) for k, v in recover_state(state).items())


@pytest.mark.filterwarnings("ignore:reduction")
def test_fedkd_loss_is_htfllib_loss_plus_mentee_loss():
    torch.manual_seed(0)
    net, mentee, w_h = create_client_net("fedavg_cnn", 5), create_client_net("fedavg_cnn", 5), nn.Linear(512, 512,
                                                                                                        bias=False)
    module = FedKDClientModule(net, mentee, w_h, num_classes=5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, _ = module.kd_loss({"image": x, "target": y})
    rep, rep_g = net.forward_features(x), mentee.forward_features(x)
    out, out_g = net.head(rep), mentee.head(rep_g)
    ce, ce_g = F.cross_entropy(out, y), F.cross_entropy(out_g, y)
    kl = nn.KLDivLoss()
    l_h = F.mse_loss(rep, w_h(rep_g)) / (ce + ce_g)
    expected = (ce + kl(F.log_softmax(out, 1), F.softmax(out_g, 1)) / (ce + ce_g) + l_h) + (
        ce_g + kl(F.log_softmax(out_g, 1), F.softmax(out, 1)) / (ce + ce_g) + l_h)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_fedkd_energy_schedule_and_payloads():
    algo = FedKD(mentee_family="fed_resnet8")
    algo.setup_server(FederationInfo(2, 10, ["fedavg_cnn"] * 2, rounds=4))
    up = {c: Payload(compress_state(algo.global_params, 0.95)) for c in (0, 1)}
    metrics = algo.aggregate(1, up)
    assert metrics["server/energy"] == pytest.approx(0.95 + 0.25 * 0.03)
    assert algo.download(0).meta["energy"] == pytest.approx(0.9575)
    assert metrics["server/compression"] > 0  # sent / dense size (> 1 for near-full-rank tensors, as in HtFLlib)
    payload = Payload({"a": torch.ones(2)}, {"x": [1, "y"]})
    again = Payload.from_dict(payload.to_dict())
    assert again.meta == payload.meta and torch.equal(again.arrays["a"], payload.arrays["a"])
