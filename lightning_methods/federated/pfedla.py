"""pFedLA: Ma, Zhang, Guo, Xu, "Layer-wised Model Aggregation for Personalized Federated Learning" (CVPR 2022, arXiv
2205.03993); a homogeneous-FL baseline of FedFree's Table 1 (FedFree: "pFedLA hypernet lr 0.005").

- The server keeps every client's model ``theta_j`` and, per client ``i``, a hypernetwork ``HN_i(v_i; psi_i)``: an
  embedding ``v_i`` (``embedding_dim``), an MLP of three ``Linear + ReLU`` (``hidden_dim``) and one output head
  ``Linear(hidden_dim, N)`` + ReLU per layer ``l``, giving the layer-wise aggregation weights ``alpha_i^l`` over the
  ``N`` clients (heads: U(0, 1) weights, zero bias, so that the ReLU outputs start positive).
- Personalized model: ``theta_bar_i^l = sum_j alpha_i^{l,j} / (sum_j alpha_i^{l,j}) * theta_j^l`` for every trainable
  parameter of layer ``l``; buffers (BatchNorm statistics, counters) are client ``i``'s own. The client trains
  locally from ``theta_bar_i`` and returns its weights; the server takes ``Delta theta_i`` = trained - sent.
- Server update: the chain rule through ``theta_bar_i(v_i, psi_i)``: ``(v_i, psi_i) <- (v_i, psi_i) - hn_lr * J^T g``
  with ``J = d theta_bar_i / d (v_i, psi_i)`` and ``g = -Delta theta_i``, plain SGD (the vector-Jacobian product is
  computed in closed form for the normalised weights, then by autograd through the small hypernetwork, float64); then
  ``theta_i <- theta_bar_i + Delta theta_i`` (= the client's trained weights).
- HeurpFedLA (``k > 0``): the ``k`` layers with the largest self-weight ``alpha_i^{l,i}`` (the raw ReLU output, as
  in the reference) stay purely local (one-hot weight on client ``i``; their heads get no gradient).
- Evaluation: after the server step every client receives its new ``theta_bar_i`` and is evaluated with it (the
  reference's ``test`` also evaluates the freshly generated ``theta_bar_i``).

Update sign: ``g = -Delta theta_i`` is the mathematically consistent descent direction. Local SGD gives ``Delta theta_i
~ -eta * grad L_i(theta_bar_i)``, so ``J^T grad L_i ~ J^T (-Delta theta_i) / eta`` and the descent step is
``psi -= hn_lr * J^T (-Delta theta_i)``, the same as pFedHN's (Shamsian et al. 2021) ``J^T (theta - theta_tilde)``. The
paper's update equation could not be checked here (only its abstract and Fig. 2 were at hand: "the server updates
the aggregation weight matrix alpha_i by hypernetworks HN_i(v_i; psi_i) according to Delta theta_i"), so this follows
the descent direction. The unofficial reimplementations KarhouTam/pFedLA (``grad_outputs = theta_after -
theta_before``) and FL-bench (``grad_outputs = -(global - trained)``) both step ``psi -= hn_lr * J^T Delta theta_i``,
i.e. ascent on this first-order model of the client loss; ``hn_update="reference"`` reproduces that (for comparisons
with numbers produced by that code).

Differences from KarhouTam/pFedLA (our choices):

- Synchronous rounds, as the paper's per-round description and this package's runtimes: every client trains from
  the round's downloads, then the server updates all hypernetworks from the same state and sets every ``theta_i``.
  The reference processes clients one after another, each seeing the others' already-updated ``theta_j``.
- Layers = parameters of one module (the parameter name without its last component: ``base.conv1.0``,
  ``head``, ...). The reference groups by the first name component, which is a layer for its ``block1...block6`` CNN
  but would give only ``base`` / ``head`` for this package's families.
- Round 1: every ``theta_j`` starts from one seeded initialisation (as FedAvg's global model), so the first
  downloads are that model; the reference initialises each client's model independently.
- An all-zero ``alpha_i^l`` (every ReLU dead) falls back to the client's own layer (as FL-bench); the reference raises.
- The hypernetworks live in float64 (the reference: float32); the client models keep their dtype.

Memory: the server holds every client's weights (``N x`` model size) plus the per-client hypernetworks
(``embedding_dim * hidden_dim + 2 * hidden_dim^2 + layers * N * (hidden_dim + 1)`` numbers each).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.federated.algorithm import (
    ClientInfo,
    FedAlgorithm,
    FederationInfo,
    Payload,
    build_net,
    cpu_state,
)

#: Key mixed into the seeds of the per-client hypernetworks.
HYPERNET_KEY = 4_242
HN_UPDATES = ("descent", "reference")


# ---------------------------------------------------------------------------------------------- pure functions
def layer_blocks(names: Iterable[str]) -> dict[str, int]:
    """Layer index of each trainable parameter: the parameters of one module (the name without its last component)
    form one layer, numbered in order of first appearance."""
    owners: dict[str, int] = {}
    return {name: owners.setdefault(name.rpartition(".")[0], len(owners)) for name in names}


def init_hypernet(num_clients: int, num_blocks: int, embedding_dim: int, hidden_dim: int, seed: int,
                  dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """One client's hypernetwork, a function of ``seed`` only: embedding ~ N(0, 1) (``nn.Embedding``), three
    ``nn.Linear`` (PyTorch's default initialisation), heads ``[num_blocks, num_clients, hidden_dim]`` ~ U(0, 1) and
    zero head biases."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hn = {"embedding": torch.randn(embedding_dim, dtype=dtype)}
        for i, fan_in in zip((0, 2, 4), (embedding_dim, hidden_dim, hidden_dim)):
            lin = nn.Linear(fan_in, hidden_dim, dtype=dtype)
            hn[f"mlp.{i}.weight"], hn[f"mlp.{i}.bias"] = lin.weight.detach(), lin.bias.detach()
        hn["heads.weight"] = torch.rand(num_blocks, num_clients, hidden_dim, dtype=dtype)
        hn["heads.bias"] = torch.zeros(num_blocks, num_clients, dtype=dtype)
    return hn


def hypernet_alpha(hn: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unnormalised layer-wise aggregation weights ``alpha[l, j] >= 0`` of one client's hypernetwork."""
    h = hn["embedding"]
    for i in (0, 2, 4):
        h = F.relu(F.linear(h, hn[f"mlp.{i}.weight"], hn[f"mlp.{i}.bias"]))
    return F.relu(torch.matmul(hn["heads.weight"], h) + hn["heads.bias"])


def local_blocks(alpha: torch.Tensor, client: int, k: int) -> list[int]:
    """HeurpFedLA: the ``k`` layers with the largest self-weight ``alpha[l, client]`` (ties: the earlier layer)."""
    if k <= 0:
        return []
    own = alpha[:, client].detach().tolist()
    return sorted(sorted(range(len(own)), key=lambda b: (-own[b], b))[:k])


def mixing_weights(alpha: torch.Tensor, client: int, local: Sequence[int] = ()) -> torch.Tensor:
    """Normalised weights ``alpha[l] / sum_j alpha[l, j]``; local layers and all-zero rows: one-hot on ``client``."""
    one_hot = torch.zeros_like(alpha[0])
    one_hot[client] = 1.0
    rows = []
    for b in range(alpha.shape[0]):
        total = alpha[b].sum()
        rows.append(one_hot if b in local or float(total.detach()) == 0.0 else alpha[b] / total)
    return torch.stack(rows)


def personalize(thetas: Sequence[Mapping[str, torch.Tensor]], weights: Mapping[int, torch.Tensor],
                block_of: Mapping[str, int], names: Iterable[str] | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """``theta_bar_c[p] = sum_j weights[c][layer(p), j] * thetas[j][p]`` (float64, cast back) for every client ``c``
    of ``weights`` and trainable parameter ``p`` of ``block_of``; other entries (buffers) are client ``c``'s own.
    ``names``: only these entries (default: all). Differentiable in ``weights``."""
    clients = sorted(weights)
    out: dict[int, dict[str, torch.Tensor]] = {c: {} for c in clients}
    for name in names if names is not None else thetas[0]:
        ref = thetas[0][name]
        if name in block_of:
            stack = torch.stack([t[name].reshape(-1) for t in thetas]).to(torch.float64)
            w = torch.stack([weights[c][block_of[name]] for c in clients]).to(torch.float64)
            for c, row in zip(clients, w @ stack):
                out[c][name] = row.reshape(ref.shape).to(ref.dtype)
        else:
            for c in clients:
                out[c][name] = thetas[c][name].clone()
    return out


def block_inner_products(thetas: Sequence[Mapping[str, torch.Tensor]],
                         grad_outputs: Mapping[int, Mapping[str, torch.Tensor]], block_of: Mapping[str, int],
                         num_blocks: int) -> dict[int, torch.Tensor]:
    """``G_c[l, j] = sum over parameters p of layer l in grad_outputs[c] of <grad_outputs[c][p], thetas[j][p]>``
    (float64), the only data :func:`hypernet_vjp` needs from the client models."""
    clients = sorted(grad_outputs)
    inner = torch.zeros(len(clients), num_blocks, len(thetas), dtype=torch.float64)
    for name in grad_outputs[clients[0]] if clients else ():
        stack = torch.stack([t[name].reshape(-1) for t in thetas]).to(torch.float64)
        g = torch.stack([grad_outputs[c][name].reshape(-1) for c in clients]).to(torch.float64)
        inner[:, block_of[name], :] += g @ stack.T
    return {c: inner[i] for i, c in enumerate(clients)}


def hypernet_vjp(hn: Mapping[str, torch.Tensor], client: int, inner: torch.Tensor,
                 k: int = 0) -> dict[str, torch.Tensor]:
    """``J^T g``: the gradient w.r.t. every hypernetwork tensor (embedding included) of ``<theta_bar_client, g>``
    ``= sum_l sum_j w[l, j] * inner[l, j]`` (``inner``: :func:`block_inner_products` of ``g``). With
    ``w = alpha / S``: ``d/d alpha[l, m] = (inner[l, m] - sum_j w[l, j] inner[l, j]) / S[l]``; local layers and
    all-zero rows are constants (no gradient), as in :func:`mixing_weights`."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in hn.items()}
    alpha = hypernet_alpha(leaves)
    local = local_blocks(alpha, client, k)
    a = alpha.detach()
    d_alpha = torch.zeros_like(a)
    for b in range(a.shape[0]):
        total = a[b].sum()
        if b in local or float(total) == 0.0:
            continue
        d_alpha[b] = (inner[b].to(a) - (a[b] / total * inner[b].to(a)).sum()) / total
    grads = torch.autograd.grad(alpha, list(leaves.values()), grad_outputs=d_alpha, allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}


def update_hypernet(hn: Mapping[str, torch.Tensor], vjp: Mapping[str, torch.Tensor],
                    lr: float) -> dict[str, torch.Tensor]:
    """Plain SGD on the hypernetwork: ``hn - lr * vjp``."""
    return {n: t.detach() - lr * vjp[n] for n, t in hn.items()}


# ---------------------------------------------------------------------------------------------- the algorithm
class PFedLA(FedAlgorithm):
    """pFedLA / HeurpFedLA (see the module docstring).

    Args:
        hn_lr: SGD learning rate of the hypernetworks and embeddings (FedFree / reference: 0.005).
        embedding_dim: size of each client embedding (reference: 100).
        hidden_dim: width of the hypernetwork MLP (reference: 100).
        k: HeurpFedLA's number of purely local layers per client (0: pFedLA).
        hn_update: ``"descent"`` (default): ``psi -= hn_lr * J^T (-Delta theta)``; ``"reference"``: ``psi -= hn_lr *
            J^T Delta theta`` as KarhouTam/pFedLA and FL-bench do (see the module docstring).
    """

    name = "pfedla"
    same_architecture = True

    def __init__(self, hn_lr: float = 0.005, embedding_dim: int = 100, hidden_dim: int = 100, k: int = 0,
                 hn_update: str = "descent") -> None:
        if isinstance(hn_lr, bool) or not isinstance(hn_lr, (int, float)) or not 0 <= hn_lr < float("inf"):
            raise ValueError(f"PFedLA hn_lr must be a finite number >= 0, got {hn_lr!r}")
        for what, value, least in (("embedding_dim", embedding_dim, 1), ("hidden_dim", hidden_dim, 1), ("k", k, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"PFedLA {what} must be an integer >= {least}, got {value!r}")
        if hn_update not in HN_UPDATES:
            raise ValueError(f"PFedLA hn_update must be one of {HN_UPDATES}, got {hn_update!r}")
        self.hn_lr, self.embedding_dim, self.hidden_dim, self.k = float(hn_lr), embedding_dim, hidden_dim, k
        self.hn_update = hn_update

    # ------------------------------------------------------------------------------------------ server side
    def setup_server(self, info: FederationInfo) -> None:
        super().setup_server(info)
        families = sorted(set(info.families))
        if len(families) != 1:
            raise ValueError(f"{type(self).__name__} aggregates whole models layer by layer and needs one client "
                             f"family; got {families}. Use it in the homogeneous setting (federation.families: "
                             "[fed_cnn]).")
        net = build_net(families[0], info, self.global_seed(), info.feature_dim, info.stem)
        self.block_of = layer_blocks(n for n, p in net.named_parameters() if p.requires_grad)
        self.num_blocks = len(set(self.block_of.values()))
        if self.k > self.num_blocks:
            raise ValueError(f"PFedLA k={self.k} exceeds the {self.num_blocks} layers of {families[0]}")
        init = cpu_state(net)
        n = info.num_clients
        self.thetas = [{key: v.clone() for key, v in init.items()} for _ in range(n)]
        self.hypernets = [init_hypernet(n, self.num_blocks, self.embedding_dim, self.hidden_dim,
                                        self.global_seed(HYPERNET_KEY, i)) for i in range(n)]

    def server_state_dict(self) -> dict[str, Any]:
        return {"thetas": self.thetas, "hypernets": self.hypernets}

    def load_server_state_dict(self, state: Mapping[str, Any]) -> None:
        self.thetas = [{k: v.clone() for k, v in t.items()} for t in state["thetas"]]
        self.hypernets = [{k: v.clone() for k, v in hn.items()} for hn in state["hypernets"]]

    def weights(self, clients: Iterable[int]) -> dict[int, torch.Tensor]:
        """Normalised layer-wise mixing weights ``[layers, N]`` of ``clients`` from their current hypernetworks."""
        out = {}
        for c in clients:
            with torch.no_grad():
                alpha = hypernet_alpha(self.hypernets[c])
            out[c] = mixing_weights(alpha, c, local_blocks(alpha, c, self.k))
        return out

    def _personalized_all(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every client's ``theta_bar`` from the current state (always computed for all clients at once, so a
        client's model is the same bits in :meth:`aggregate`'s recomputation as in its download)."""
        return personalize(self.thetas, self.weights(range(self.info.num_clients)), self.block_of)

    def initial_download(self, client: int) -> Payload | None:
        if client not in self.pending:
            self.pending = {c: Payload(p) for c, p in self._personalized_all().items()}
        return self.pending.pop(client)

    def aggregate(self, round: int, uploads: Mapping[int, Payload]) -> dict[str, Any]:
        clients = sorted(uploads)
        for c in clients:
            if set(uploads[c].arrays) != set(self.thetas[c]):
                raise ValueError(f"PFedLA: client {c} uploaded entries {sorted(uploads[c].arrays)[:4]}..., expected "
                                 f"the state dict of the federation's family ({len(self.thetas[c])} entries)")
        sign = -1.0 if self.hn_update == "descent" else 1.0
        # what every client started from: the same function of the same state as its download
        sent_weights = self.weights(range(self.info.num_clients))
        inner = {c: torch.zeros(self.num_blocks, self.info.num_clients, dtype=torch.float64) for c in clients}
        for name, block in self.block_of.items():  # one parameter at a time: memory of one layer over all clients
            sent = personalize(self.thetas, sent_weights, self.block_of, names=[name])
            g = {c: {name: sign * (uploads[c].arrays[name].double() - sent[c][name].double())} for c in clients}
            for c, part in block_inner_products(self.thetas, g, {name: block}, self.num_blocks).items():
                inner[c] += part
        for c in clients:
            vjp = hypernet_vjp(self.hypernets[c], c, inner[c], self.k)
            self.hypernets[c] = update_hypernet(self.hypernets[c], vjp, self.hn_lr)
        for c in clients:  # theta_c <- theta_bar_c + Delta theta_c: the client's trained weights
            self.thetas[c] = {k: v.detach().cpu().clone() for k, v in uploads[c].arrays.items()}
        new_weights = self.weights(range(self.info.num_clients))
        self.pending = {c: Payload(p) for c, p in personalize(self.thetas, new_weights, self.block_of).items()}
        own = torch.stack([w[:, c] for c, w in new_weights.items()])
        return {"server/self_weight": float(own.mean()),
                "server/local_layers": float((own == 1.0).sum(1).double().mean())}

    # ------------------------------------------------------------------------------------------ client side
    def apply_download(self, net: nn.Module, extra: dict[str, Any], payload: Payload, info: ClientInfo) -> None:
        net.load_state_dict(payload.arrays, strict=True)

    def upload(self, before: Mapping[str, torch.Tensor], net: nn.Module, extra: dict[str, Any],
               info: ClientInfo) -> Payload:
        return Payload(cpu_state(net), {"num_examples": info.num_examples})
