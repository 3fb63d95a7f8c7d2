"""pFedLA (homogeneous baseline of FedFree's Table 1): golden numbers of the unofficial reference KarhouTam/pFedLA,
the aggregation and the hypernetwork's vector-Jacobian product against independent computations, HeurpFedLA,
buffers, the update direction, server state round trip, and tiny runs on the bundled digits (with kill and resume)."""

from __future__ import annotations

import io
import math
from collections import OrderedDict

import pytest
import torch
from fedfree_testing import assert_same_state, kill_and_resume
from torch import nn

from lightning_methods.federated.algorithm import FederationInfo, Payload
from lightning_methods.federated.pfedla import (
    PFedLA,
    block_inner_products,
    hypernet_alpha,
    hypernet_vjp,
    init_hypernet,
    layer_blocks,
    local_blocks,
    mixing_weights,
    personalize,
    update_hypernet,
)

F64 = torch.float64
# Float64 tolerances: every golden / reference quantity is O(1) and comes from at most ~20-term sums through a
# 4-layer 5-wide MLP, its backward pass and one normalisation; the rounding error of such a chain is a few hundred
# units of 1.1e-16 at worst, so 1e-13 absolute is a bound, not a fit to one machine's output.
EXACT = {"rtol": 0.0, "atol": 1e-13}

# ----------------------------------------------------------------------------------------------------------------------
# Golden values: KarhouTam/pFedLA at commit c8b505c. Its HyperNetwork (src/utils/models.py; file caching replaced by
# in-memory per-client mlp / fc dicts, blocks in the order block1, block2, block3) and pFedLAServer's
# generate_client_model_parameters, update_hypernetwork and update_client_model_parameters (src/server/pFedLA.py) were
# copied into a standalone script and run in float64 (torch.set_default_dtype(torch.float64); its one-hot
# default_weight made float64) on the tiny inputs of _reference_inputs below: 3 clients, embedding_dim 4, hidden_dim 5,
# hn_lr 0.5, a model of three blocks (block1: weight 2x3, bias 2, buffer running_mean 2; block2: weight 2x2; block3:
# weight 1x2, bias 1). Each case starts from the same initial state (one synchronous round) and updates one client.
# The reference steps psi -= hn_lr * J^T diff with diff = theta_after - theta_before; our default (descent) steps
# psi -= hn_lr * J^T (-Delta theta). So the "descent" cases below were produced by running the reference with the
# diff NEGATED (grad_outputs = -diff), and the "reference" case with the diff as is; both are compared with our update
# for Delta theta = diff. dphi = hypernetwork after - before.
# ----------------------------------------------------------------------------------------------------------------------
SHAPES = OrderedDict([("block1.weight", (2, 3)), ("block1.bias", (2,)), ("block1.running_mean", (2,)),
                      ("block2.weight", (2, 2)), ("block3.weight", (1, 2)), ("block3.bias", (1,))])
TRAINABLE = [n for n in SHAPES if "running" not in n]
REF_LR = 0.5
REF_EMBEDDING_0 = [-0.1467950974849952, 0.7861412987235358, 0.9468216090039564, -1.1143440212610307]
GOLDEN = {
    # (client, k, hn_update)
    (0, 0, "descent"): {
        "alpha": [[0.10575764906729834, 0.23786564735959267, 0.20061057838731072],
                  [0.16079702807950372, 0.12352144722712013, 0.2511579050500836],
                  [0.1490913490923131, 0.11255844516873645, 0.12829807070783228]],
        "local": [],
        "personalized": {
            "block1.weight": [[-0.8152794789252359, -0.47900893346711365, -0.4096972455078508],
                              [-0.4869084713939565, 0.30522661198569007, 0.2237995898436868]],
            "block1.bias": [-0.8011870240278955, 0.9530864432989902],
            "block1.running_mean": [-0.44394351470093246, 0.18883470052089937],
            "block2.weight": [[0.5681364844896382, -0.3904994336896209], [0.5155429457149409, -0.9342908896645818]],
            "block3.weight": [[-0.08093618544327857, -0.46252941363407984]],
            "block3.bias": [0.4521595426428689]},
        "dphi.embedding": [-0.006249209921413146, 0.018145945944624042, 0.0027601829325943905, -0.014773962671302376],
        "dphi.heads.bias": [[-0.09304887368233494, -0.06094782648293321, 0.12131974557960915],
                            [0.19166111782578366, 0.14499583651206338, -0.1940159267650427],
                            [0.1402780196486391, -0.05701980650151207, -0.11298828075749265]],
        "dphi.mlp.4.bias": [0.0, 0.0, 0.22908362193859766, -0.03295343812583504, -0.01909332939176908],
        "dphi sums": {"embedding": -0.00011704371549708936, "mlp.0.weight": 0.019779415143342888,
                      "mlp.0.bias": 0.04192119093028565, "mlp.2.weight": 0.0296168519431248,
                      "mlp.2.bias": 0.02887740252701601, "mlp.4.weight": 0.18067951355648076,
                      "mlp.4.bias": 0.17703685442099354, "heads.weight": 0.025004308623355218,
                      "heads.bias": 0.08023400537677966},
    },
    (1, 0, "descent"): {
        "alpha": [[0.4211671338895862, 0.4182698124005032, 0.42636175127259834],
                  [0.5752498679016369, 0.3313053702793863, 0.295747783048322],
                  [0.6089482125818575, 0.25213277524187266, 0.6414210623960725]],
        "local": [],
        "personalized": {
            "block1.weight": [[-0.6870616320822904, -0.03637870369619331, -0.48639489206866765],
                              [-0.15936891948388698, 0.2848220066645881, 0.0398827656612685]],
            "block1.bias": [-0.820443450186299, 0.9268314963575142],
            "block1.running_mean": [-0.6997519918543387, 0.38893382530240184],
            "block2.weight": [[0.5697721442781906, 0.04976627563453617], [0.2626608471770025, -1.0020504311757394]],
            "block3.weight": [[-0.09882020641407532, -0.3228461844338071]],
            "block3.bias": [0.438018860350673]},
        "dphi.embedding": [-0.0016794817477274737, -0.003240312127131273, -0.006360021648932512,
                           -0.0032849747649199568],
        "dphi.heads.bias": [[-0.09654822873368613, 0.17317864468091274, -0.07451995482648718],
                            [-0.01190197022918521, 0.033234694069914035, -0.014080328109058335],
                            [0.003396567237909917, 0.0504468268420387, -0.023054484595545606]],
        "dphi.mlp.4.bias": [0.07046966127607876, 0.0, 0.0, -0.005635394419697515, -0.027498340331290394],
        "dphi sums": {"embedding": -0.014564790288711216, "mlp.0.weight": -0.04686236202421308,
                      "mlp.0.bias": -0.028015614665970884, "mlp.2.weight": 0.027196509533706184,
                      "mlp.2.bias": 0.015378256935277314, "mlp.4.weight": 0.018183950396702037,
                      "mlp.4.bias": 0.03733592652509085, "heads.weight": 0.03298763395196787,
                      "heads.bias": 0.040151766336812944},
    },
    (0, 0, "reference"): {  # the reference's own sign: the exact negation of the (0, 0, "descent") update
        "dphi.embedding": [0.006249209921413146, -0.018145945944624042, -0.0027601829325943905, 0.014773962671302376],
        "dphi.heads.bias": [[0.09304887368233494, 0.06094782648293321, -0.12131974557960915],
                            [-0.19166111782578366, -0.14499583651206338, 0.1940159267650427],
                            [-0.1402780196486391, 0.05701980650151207, 0.11298828075749265]],
        "dphi.mlp.4.bias": [0.0, 0.0, -0.22908362193859766, 0.03295343812583504, 0.01909332939176908],
        "dphi sums": {"embedding": 0.00011704371549708936, "mlp.0.weight": -0.019779415143342888,
                      "mlp.0.bias": -0.04192119093028565, "mlp.2.weight": -0.029616851943124772,
                      "mlp.2.bias": -0.02887740252701601, "mlp.4.weight": -0.18067951355648076,
                      "mlp.4.bias": -0.17703685442099354, "heads.weight": -0.025004308623355218,
                      "heads.bias": -0.08023400537677966},
    },
    (2, 1, "descent"): {  # HeurpFedLA, K = 1: block2 has the largest self-weight and stays local
        "alpha": [[0.18853125536692905, 0.41663603799058807, 0.41796359897066604], None,
                  [0.2806835027452525, 0.5624644032329273, 0.24449867083111004]],
        "local": [1],
        "personalized": {
            "block1.weight": [[-0.8304237958629429, -0.4350790001562113, -0.4127506512944323],
                              [-0.5009605865840538, 0.2412910793733673, 0.16253846749581263]],
            "block1.bias": [-0.8260008153880074, 0.9820547615636515],
            "block1.running_mean": [-1.9098783205693652, 0.07017799634634075],
            "block2.weight": [[0.5745408011214433, -1.3964266182052967], [1.3639311875042512, -0.9215877772203613]],
            "block3.weight": [[0.03278340144037083, -0.6450083685092863]],
            "block3.bias": [0.425597224283029]},
        "dphi.embedding": [0.005481378854752528, -0.003064768197247991, 0.003847751993992621, -0.00018520618834697022],
        "dphi.heads.bias": [[0.06008609799229528, -0.1374506163723932, 0.10991094165450171], [0.0, 0.0, 0.0],
                            [0.0508325811543475, -0.0471291406896553, 0.05006406382208258]],
        "dphi.mlp.4.bias": [0.060706854017878786, 0.04691973711203862, 0.02437039301991456, 0.0, -0.04734939149525047],
        "dphi sums": {"embedding": 0.006079156463150187, "mlp.0.weight": -0.017723644931173614,
                      "mlp.0.bias": 0.016207579182824866, "mlp.2.weight": -0.01963903291807531,
                      "mlp.2.bias": -0.028032361694558305, "mlp.4.weight": 0.025265310456794005,
                      "mlp.4.bias": 0.0846475926545815, "heads.weight": 0.06439499263715984,
                      "heads.bias": 0.08631392756117859},
    },
}


def _reference_inputs():
    """The golden script's inputs, rebuilt: client models and diffs from a seeded generator, and the hypernetworks
    constructed in the reference's order under ``torch.manual_seed(7)`` (embedding table, then per client three
    ``nn.Linear`` and one U(0, 1) head per block), as this module's hypernetwork dicts."""
    g = torch.Generator().manual_seed(2024)
    thetas = [{n: torch.randn(s, generator=g, dtype=F64) for n, s in SHAPES.items()} for _ in range(3)]
    diffs = [{n: 0.1 * torch.randn(s, generator=g, dtype=F64) for n, s in SHAPES.items()} for _ in range(3)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        table = nn.Embedding(3, 4, dtype=F64).weight.detach()
        hns = []
        for c in range(3):
            lins = [nn.Linear(4, 5, dtype=F64), nn.Linear(5, 5, dtype=F64), nn.Linear(5, 5, dtype=F64)]
            heads = [torch.empty(3, 5, dtype=F64).uniform_() for _ in range(3)]
            hn = {"embedding": table[c].clone()}
            for i, lin in zip((0, 2, 4), lins):
                hn[f"mlp.{i}.weight"], hn[f"mlp.{i}.bias"] = lin.weight.detach(), lin.bias.detach()
            hn["heads.weight"], hn["heads.bias"] = torch.stack(heads), torch.zeros(3, 3, dtype=F64)
            hns.append(hn)
    return thetas, diffs, hns


def _bare_algorithm(thetas, hns, k=0, hn_update="descent", lr=REF_LR):
    """A PFedLA whose server state is set by hand (the tiny golden model is no client family)."""
    algo = PFedLA(hn_lr=lr, embedding_dim=4, hidden_dim=5, k=k, hn_update=hn_update)
    algo.info, algo.pending = FederationInfo(len(thetas), 10, ["tiny"] * len(thetas)), {}
    algo.block_of = layer_blocks(TRAINABLE)
    algo.num_blocks = len(set(algo.block_of.values()))
    algo.thetas = [{n: v.clone() for n, v in t.items()} for t in thetas]
    algo.hypernets = [{n: v.clone() for n, v in hn.items()} for hn in hns]
    return algo


def _t(x):
    return torch.tensor(x, dtype=F64)


@pytest.mark.parametrize("case", list(GOLDEN))
def test_server_round_matches_reference_golden_values(case):
    client, k, hn_update = case
    thetas, diffs, hns = _reference_inputs()
    assert hns[0]["embedding"].tolist() == REF_EMBEDDING_0  # the inputs are the golden script's
    gold = GOLDEN[case]
    alpha = hypernet_alpha(hns[client])
    local = local_blocks(alpha, client, k)
    if "alpha" in gold:
        assert local == gold["local"]
        for b, row in enumerate(gold["alpha"]):
            if row is not None:  # the reference replaces a local block's alpha by the one-hot
                torch.testing.assert_close(alpha[b], _t(row), **EXACT)
        sent = personalize(thetas, {client: mixing_weights(alpha, client, local)}, layer_blocks(TRAINABLE))[client]
        for name, value in gold["personalized"].items():
            torch.testing.assert_close(sent[name], _t(value), **EXACT)
        assert torch.equal(sent["block1.running_mean"], thetas[client]["block1.running_mean"])  # buffer: own
        for b in local:  # a local block is the client's own
            assert torch.equal(sent[f"block{b + 1}.weight"], thetas[client][f"block{b + 1}.weight"])

    # the algorithm's server step, client `client` uploading theta_bar + diff
    algo = _bare_algorithm(thetas, hns, k=k, hn_update=hn_update)
    sent = personalize(thetas, algo.weights(range(3)), algo.block_of)[client]
    upload = {n: sent[n] + diffs[client][n] for n in SHAPES}
    algo.aggregate(1, {client: Payload(upload, {"num_examples": 1})})
    dphi = {n: algo.hypernets[client][n] - hns[client][n] for n in hns[client]}
    for key in ("embedding", "heads.bias", "mlp.4.bias"):
        torch.testing.assert_close(dphi[key], _t(gold[f"dphi.{key}"]), **EXACT)
    for key, total in gold["dphi sums"].items():
        assert math.isclose(float(dphi[key].sum()), total, rel_tol=0.0, abs_tol=1e-13), key
    for c in (0, 1, 2):  # the other clients' hypernetworks and models are untouched
        if c != client:
            assert all(torch.equal(algo.hypernets[c][n], hns[c][n]) for n in hns[c])
            assert all(torch.equal(algo.thetas[c][n], thetas[c][n]) for n in SHAPES)
    # theta_i <- theta_bar_i + Delta theta_i (the reference's update_client_model_parameters)
    assert all(torch.equal(algo.thetas[client][n], upload[n]) for n in SHAPES)


def test_aggregation_is_the_normalised_weighted_sum():
    thetas = [{"a.weight": torch.full((2,), float(j + 1), dtype=F64), "a.bias": torch.full((1,), 10.0 * (j + 1),
                                                                                           dtype=F64),
               "b.weight": torch.full((3,), -float(j), dtype=F64), "c.weight": torch.full((1,), 2.0 ** j, dtype=F64),
               "b.running_var": torch.full((3,), 100.0 + j, dtype=F64)} for j in range(3)]
    block_of = layer_blocks(["a.weight", "a.bias", "b.weight", "c.weight"])
    assert block_of == {"a.weight": 0, "a.bias": 0, "b.weight": 1, "c.weight": 2}
    alpha = _t([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0]])  # layer 1: every ReLU dead
    w = mixing_weights(alpha, 2)
    torch.testing.assert_close(w, _t([[0.25, 0.5, 0.25], [0.0, 0.0, 1.0], [0.75, 0.0, 0.25]]), **EXACT)
    out = personalize(thetas, {2: w}, block_of)[2]
    torch.testing.assert_close(out["a.weight"], torch.full((2,), 0.25 * 1 + 0.5 * 2 + 0.25 * 3, dtype=F64), **EXACT)
    torch.testing.assert_close(out["a.bias"], torch.full((1,), 0.25 * 10 + 0.5 * 20 + 0.25 * 30, dtype=F64), **EXACT)
    assert torch.equal(out["b.weight"], thetas[2]["b.weight"])  # dead layer: the client's own
    torch.testing.assert_close(out["c.weight"], torch.full((1,), 0.75 * 1 + 0.25 * 4, dtype=F64), **EXACT)
    assert torch.equal(out["b.running_var"], thetas[2]["b.running_var"])  # buffer: own
    # HeurpFedLA: k = 1 keeps the layer with the largest raw self-weight alpha[l, 2] (layer 0: 1.0 > 0 and 1.0 ->
    # tie with layer 2 broken by the earlier layer)
    assert local_blocks(alpha, 2, 1) == [0]
    assert local_blocks(alpha, 0, 2) == [0, 2]
    torch.testing.assert_close(mixing_weights(alpha, 2, [0])[0], _t([0.0, 0.0, 1.0]), **EXACT)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_hypernet_vjp_equals_autograd_of_the_surrogate(k):
    """J^T g from the closed form + autograd through the hypernetwork equals plain autograd of <theta_bar(hn), g>."""
    gen = torch.Generator().manual_seed(5)
    names = {"l1.weight": (4, 3), "l1.bias": (4,), "l2.weight": (2, 4), "l3.weight": (3, 2), "l3.bias": (3,),
             "bn.running_mean": (4,)}
    thetas = [{n: torch.randn(s, generator=gen, dtype=F64) for n, s in names.items()} for _ in range(4)]
    block_of = layer_blocks([n for n in names if "running" not in n])
    g = {n: torch.randn(names[n], generator=gen, dtype=F64) for n in block_of}
    client = 1
    hn = init_hypernet(4, 3, embedding_dim=6, hidden_dim=7, seed=11)
    leaves = {n: t.clone().requires_grad_(True) for n, t in hn.items()}
    alpha = hypernet_alpha(leaves)
    theta_bar = personalize(thetas, {client: mixing_weights(alpha, client, local_blocks(alpha, client, k))},
                            block_of)[client]
    surrogate = sum((theta_bar[n] * g[n]).sum() for n in block_of)
    expected = torch.autograd.grad(surrogate, list(leaves.values()))
    inner = block_inner_products(thetas, {client: g}, block_of, 3)[client]
    vjp = hypernet_vjp(hn, client, inner, k)
    for (name, _), want in zip(leaves.items(), expected):
        torch.testing.assert_close(vjp[name], want, rtol=0.0, atol=1e-12, msg=name)
    assert any(float(v.abs().max()) > 1e-3 for v in vjp.values())  # not trivially zero
    for b in local_blocks(hypernet_alpha(hn), client, k):  # local layers: their heads get no gradient
        assert not vjp["heads.weight"][b].any() and not vjp["heads.bias"][b].any()
    new = update_hypernet(hn, vjp, 0.1)
    torch.testing.assert_close(new["embedding"], hn["embedding"] - 0.1 * vjp["embedding"], rtol=0.0, atol=0.0)


@pytest.mark.parametrize("hn_update,better", [("descent", True), ("reference", False)])
def test_update_direction_on_a_quadratic_client_loss(hn_update, better):
    """A client with loss ||theta - target||^2 taking one gradient step: the default update lowers the loss of its
    next personalized model, the reference's sign raises it."""
    gen = torch.Generator().manual_seed(3)
    names = {"l1.weight": (3, 3), "l2.weight": (2, 3)}
    thetas = [{n: torch.randn(s, generator=gen, dtype=F64) for n, s in names.items()} for _ in range(3)]
    target = {n: torch.randn(s, generator=gen, dtype=F64) for n, s in names.items()}
    hns = [init_hypernet(3, 2, 4, 5, seed=c) for c in range(3)]
    algo = _bare_algorithm(thetas, hns, hn_update=hn_update, lr=1e-3)
    algo.block_of, algo.num_blocks = layer_blocks(names), 2

    def loss(hn):
        w = mixing_weights(hypernet_alpha(hn), 0)
        bar = personalize(thetas, {0: w}, algo.block_of)[0]
        return sum(float((bar[n] - target[n]).pow(2).sum()) for n in names)

    sent = personalize(thetas, algo.weights(range(3)), algo.block_of)[0]
    trained = {n: sent[n] - 0.05 * 2 * (sent[n] - target[n]) for n in names}
    before = loss(hns[0])
    algo.aggregate(1, {0: Payload(trained, {"num_examples": 1})})
    assert (loss(algo.hypernets[0]) < before) is better


def _uploads(algo, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for c in range(algo.info.num_clients):
        state = {n: v.clone() for n, v in algo.thetas[c].items()}
        for v in state.values():
            if v.is_floating_point():
                v.add_(scale * torch.randn(v.shape, generator=gen))
            else:
                v.add_(c + 1)
        out[c] = Payload(state, {"num_examples": 10})
    return out


def test_server_state_round_trip_buffers_and_heurpfedla():
    info = FederationInfo(3, 10, ["fed_resnet8"] * 3, seed=1, image_size=8)
    a = PFedLA(embedding_dim=8, hidden_dim=8, k=2, hn_lr=0.5)
    a.setup_server(info)
    downloads = [a.initial_download(c) for c in range(3)]
    assert all(torch.equal(downloads[0].arrays[n], downloads[2].arrays[n]) for n in downloads[0].arrays)  # one init
    a.aggregate(1, _uploads(a, 0.1, seed=0))
    blob = io.BytesIO()
    torch.save(a.server_state_dict(), blob)
    blob.seek(0)
    b = PFedLA(embedding_dim=8, hidden_dim=8, k=2, hn_lr=0.5)
    b.setup_server(info)
    b.load_server_state_dict(torch.load(blob, weights_only=True))
    uploads = _uploads(a, 0.1, seed=1)
    ma, mb = a.aggregate(2, uploads), b.aggregate(2, uploads)
    assert ma == mb and 0.0 < ma["server/self_weight"] <= 1.0 and ma["server/local_layers"] >= 2.0
    for c in range(3):
        assert all(torch.equal(a.hypernets[c][n], b.hypernets[c][n]) for n in a.hypernets[c])
        assert all(torch.equal(a.thetas[c][n], b.thetas[c][n]) for n in a.thetas[c])
        pa, pb = a.download(c).arrays, b.download(c).arrays
        assert all(torch.equal(pa[n], pb[n]) for n in pa)
        for n, v in pa.items():  # buffers (BatchNorm statistics, counters) are the client's own upload
            if n not in a.block_of:
                assert torch.equal(v, uploads[c].arrays[n]), n
        with torch.no_grad():  # HeurpFedLA: the k layers of largest self-weight are the client's own upload
            local = local_blocks(hypernet_alpha(a.hypernets[c]), c, a.k)
        assert len(local) == 2
        for n, b_ in a.block_of.items():
            if b_ in local:
                assert torch.equal(pa[n], uploads[c].arrays[n]), n


def test_arguments_families_and_uploads_are_checked():
    for kwargs, match in [({"hn_lr": -1.0}, "hn_lr"), ({"hn_lr": float("nan")}, "hn_lr"),
                          ({"embedding_dim": 0}, "embedding_dim"), ({"hidden_dim": 2.5}, "hidden_dim"),
                          ({"k": -1}, "k must be"), ({"k": True}, "k must be"), ({"hn_update": "ascent"}, "hn_update")]:
        with pytest.raises(ValueError, match=match):
            PFedLA(**kwargs)
    with pytest.raises(ValueError, match="needs one client family"):
        PFedLA().setup_server(FederationInfo(2, 10, ["fedavg_cnn", "fed_resnet8"]))
    with pytest.raises(ValueError, match="k=9 exceeds the 4 layers"):
        PFedLA(k=9).setup_server(FederationInfo(2, 10, ["fedavg_cnn"] * 2))
    algo = PFedLA(embedding_dim=4, hidden_dim=4)
    algo.setup_server(FederationInfo(2, 10, ["fedavg_cnn"] * 2))
    with pytest.raises(ValueError, match="client 1 uploaded"):
        algo.aggregate(1, {1: Payload({"head.weight": torch.zeros(10, 512)}, {"num_examples": 1})})


@pytest.mark.filterwarnings("ignore:.*cover only")  # 3 clients x 2 classes of the 10 digits
def test_tiny_run_on_digits_and_resume(tmp_path, one_thread, monkeypatch):
    full, resumed, calls = kill_and_resume(tmp_path, lambda: PFedLA(embedding_dim=8, hidden_dim=8), monkeypatch,
                                           rounds=2, kill_round=2, num_clients=3, families=["fedavg_cnn"])
    assert calls == [(2, 0), (2, 1), (2, 2)]  # round 1 is not redone
    assert len(full.history) == 2
    for record in full.history:
        assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in record["client_acc"])
        assert math.isfinite(record["acc/mean"]) and 0.0 < record["server/self_weight"] <= 1.0
    assert_same_state(full.algorithm.server_state_dict(), resumed.algorithm.server_state_dict())
    assert_same_state(full.clients, resumed.clients)
    assert [h["client_acc"] for h in full.history] == [h["client_acc"] for h in resumed.history]
