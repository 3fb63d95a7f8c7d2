"""FedKD: Wu et al., "Communication-efficient federated learning via knowledge distillation" (Nature Communications
2022, arXiv 2108.13323), as implemented in HtFLlib (``clientkd.py`` / ``serverkd.py``).

Every client keeps its own model (the mentor) and a copy of a small shared model (the mentee, HtFLlib: the first
family, the CNN) plus a private ``W_h = Linear(512, 512, bias=False)``. Local loss, summed over both models (HtFLlib
back-propagates ``loss + loss_g``, so every term reaches every model):

    CE + CE_g + [KL(p_g || p) + KL(p || p_g) + 2 MSE(f, W_h f_g)] / (CE + CE_g)

with ``KLDivLoss`` / ``MSELoss`` elementwise means, three SGD optimizers (local lr, mentee lr, local lr) and gradient
norms clipped to 10 per model. The mentee's parameters travel compressed: each weight (2-d, or every (kh, kw)
kernel of a conv weight, with one rank for the whole tensor) keeps the smallest number of singular values whose
energy exceeds ``energy`` of the total; the server averages the clients' recovered mentees (unweighted),
re-compresses and sends the average back. ``energy`` grows linearly from ``t_start`` to ``t_end`` over the rounds
(FedFree / HtFLlib: 0.95 -> 0.98). HtFLlib's loop leaves the rank at 0 (a zero tensor) when the top ``r - 1`` values
do not reach the energy; here the full rank is kept then (our fix). Evaluation uses the mentor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.federated.algorithm import (
    ClientData,
    ClientInfo,
    FedAlgorithm,
    FederationInfo,
    Payload,
    build_net,
    cpu_state,
)
from lightning_methods.federated.client import FedClientModule

SEP = "::"


def svd_compress(param: torch.Tensor, energy: float) -> dict[str, torch.Tensor]:
    """HtFLlib's ``decomposition`` for one tensor: ``{"": param}`` if it stays dense, else ``{"u", "s", "v"}``."""
    if param.ndim < 2 or param.shape[0] <= 1:
        return {"": param.detach().clone()}
    u, s, vh = torch.linalg.svd(param.detach(), full_matrices=False)  # batched over leading dims for conv kernels
    total = s.pow(2).sum()
    if total == 0:
        return {"": param.detach().clone()}
    cum = s.pow(2).flatten(0, -2).sum(0).cumsum(0) if s.ndim > 1 else s.pow(2).cumsum(0)
    # rank r keeps sigma[:r]; HtFLlib takes the first n with sum(sigma[:n]^2) > energy * total (n < rank)
    above = torch.nonzero(torch.cat([cum.new_zeros(1), cum[:-1]]) > energy * total).flatten()
    rank = int(above[0]) if len(above) else s.shape[-1]
    return {"u": u[..., :rank].contiguous(), "s": s[..., :rank].contiguous(), "v": vh[..., :rank, :].contiguous()}


def svd_recover(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`svd_compress`: ``u diag(s) v``."""
    if "" in parts:
        return parts[""]
    return (parts["u"] * parts["s"].unsqueeze(-2)) @ parts["v"]


def compress_state(params: Mapping[str, torch.Tensor], energy: float) -> dict[str, torch.Tensor]:
    """Flat ``{name::part: tensor}`` dict of every tensor's :func:`svd_compress`."""
    return {f"{name}{SEP}{part}": t for name, p in params.items() for part, t in svd_compress(p, energy).items()}


def recover_state(arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        name, part = key.rsplit(SEP, 1)
        grouped.setdefault(name, {})[part] = value
    return {name: svd_recover(parts) for name, parts in grouped.items()}


def _kl_mean(log_input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``nn.KLDivLoss()`` (reduction ``"mean"``: over all elements, as HtFLlib uses it) without its per-call warning."""
    return F.kl_div(log_input, target, reduction="sum") / log_input.numel()


class FedKDClientModule(FedClientModule):
    """Mutual distillation of the client model and the mentee (see the module docstring)."""

    def __init__(self, backbone: nn.Module, mentee: nn.Module, w_h: nn.Linear, mentee_lr: float = 0.01,
                 clip: float = 10.0, lr: float = 0.01, **kwargs: Any) -> None:
        for name in ("optimizer", "lr_scheduler"):
            if kwargs.get(name) is not None:
                raise ValueError(f"FedKD clients build their own SGD optimizers (lr, mentee_lr, as HtFLlib does); "
                                 f"{name} is not used: remove it")
        super().__init__(backbone=backbone, lr=lr, **kwargs)
        self.mentee, self.w_h = mentee, w_h
        self.lr, self.mentee_lr, self.clip = lr, mentee_lr, clip
        self.sgd = {"momentum": kwargs.get("momentum", 0.0), "weight_decay": kwargs.get("weight_decay", 0.0)}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.backbone.parameters(), lr=self.lr, **self.sgd),
                torch.optim.SGD(self.mentee.parameters(), lr=self.mentee_lr),
                torch.optim.SGD(self.w_h.parameters(), lr=self.lr)]

    def kd_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch["image"], batch["target"]
        rep, rep_g = self.backbone.forward_features(x), self.mentee.forward_features(x)
        out, out_g = self.backbone.head(rep), self.mentee.head(rep_g)
        ce, ce_g = F.cross_entropy(out, y), F.cross_entropy(out_g, y)
        denom = ce + ce_g
        l_d = _kl_mean(F.log_softmax(out, 1), F.softmax(out_g, 1)) / denom
        l_d_g = _kl_mean(F.log_softmax(out_g, 1), F.softmax(out, 1)) / denom
        l_h = F.mse_loss(rep, self.w_h(rep_g)) / denom
        return (ce + l_d + l_h) + (ce_g + l_d_g + l_h), out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opts = self.optimizers()
        loss, logits = self.kd_loss(batch)
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for module in (self.backbone, self.mentee, self.w_h):
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.clip)
        for opt in opts:
            opt.step()
        self.train_metrics.update(logits.detach(), batch["target"])
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, batch_size=batch["target"].shape[0])
        return loss.detach()


class FedKD(FedAlgorithm):
    """FedKD (see the module docstring).

    Args:
        mentee_family: the shared mentee (HtFLlib: the first client family, the CNN).
        mentee_lr: the mentee's learning rate (0.01).
        t_start, t_end: SVD energy at the first and after the last round (0.95, 0.98).
        clip: gradient-norm clipping per model (10).
    """

    name = "fedkd"

    def __init__(self, mentee_family: str = "fed_cnn", mentee_lr: float = 0.01, t_start: float = 0.95,
                 t_end: float = 0.98, clip: float = 10.0) -> None:
        if not 0 < t_start <= 1 or not 0 < t_end <= 1:
            raise ValueError(f"FedKD energies must be in (0, 1], got t_start={t_start}, t_end={t_end}")
        self.mentee_family, self.mentee_lr, self.t_start, self.t_end, self.clip = (mentee_family, mentee_lr, t_start,
                                                                                  t_end, clip)

    def _mentee(self, info: FederationInfo | ClientInfo, seed: int) -> nn.Module:
        return build_net(self.mentee_family, info, seed, info.feature_dim, info.stem)

    def setup_server(self, info: FederationInfo) -> None:
        super().setup_server(info)
        mentee = self._mentee(info, self.global_seed())
        self.global_params = {k: v.detach().clone() for k, v in mentee.named_parameters()}
        self.energy = self.t_start

    def server_state_dict(self) -> dict[str, Any]:
        return {"global_params": self.global_params, "energy": self.energy}

    def load_server_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_params = {k: v.clone() for k, v in state["global_params"].items()}
        self.energy = float(state["energy"])

    def initial_download(self, client: int) -> Payload | None:
        return Payload({f"{k}{SEP}": v for k, v in self.global_params.items()}, {"energy": self.energy})

    def aggregate(self, round: int, uploads: Mapping[int, Payload]) -> dict[str, Any]:
        recovered = [recover_state(uploads[c].arrays) for c in sorted(uploads)]
        self.global_params = {k: sum(r[k].double() for r in recovered).div(len(recovered)).to(v.dtype)
                              for k, v in self.global_params.items()}
        arrays = compress_state(self.global_params, self.energy)
        sent = sum(v.numel() for v in arrays.values())
        self.energy = self.t_start + (round / self.info.rounds) * (self.t_end - self.t_start)
        self.pending = {c: Payload(dict(arrays), {"energy": self.energy}) for c in range(self.info.num_clients)}
        return {"server/compression": sent / sum(v.numel() for v in self.global_params.values()),
                "server/energy": self.energy}

    def init_client(self, net: nn.Module, info: ClientInfo) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(info.seed)
            w_h = nn.Linear(net.num_features, net.num_features, bias=False)
        return {"w_h": w_h.weight.detach().clone(), "mentee": None, "energy": self.t_start}

    def apply_download(self, net: nn.Module, extra: dict[str, Any], payload: Payload, info: ClientInfo) -> None:
        mentee = self._mentee(info, 0) if extra.get("mentee") is None else None
        state = cpu_state(mentee) if mentee is not None else extra["mentee"]
        state.update(recover_state(payload.arrays))
        extra["mentee"], extra["energy"] = state, float(payload.meta["energy"])

    def make_module(self, net: nn.Module, extra: dict[str, Any], info: ClientInfo) -> FedClientModule:
        mentee = self._mentee(info, 0)
        mentee.load_state_dict(extra["mentee"])
        w_h = nn.Linear(net.num_features, net.num_features, bias=False)
        with torch.no_grad():
            w_h.weight.copy_(extra["w_h"])
        return FedKDClientModule(net, mentee, w_h, mentee_lr=self.mentee_lr, clip=self.clip, lr=info.lr,
                                 num_classes=info.num_classes, momentum=info.momentum, weight_decay=info.weight_decay)

    def after_fit(self, module: FedClientModule, extra: dict[str, Any], info: ClientInfo, data: ClientData) -> None:
        extra["mentee"] = cpu_state(module.mentee)
        extra["w_h"] = module.w_h.weight.detach().cpu().clone()

    def upload(self, before: Mapping[str, torch.Tensor], net: nn.Module, extra: dict[str, Any],
               info: ClientInfo) -> Payload:
        mentee = self._mentee(info, 0)
        mentee.load_state_dict(extra["mentee"])
        params = {k: v.detach() for k, v in mentee.named_parameters()}
        return Payload(compress_state(params, extra["energy"]), {"num_examples": info.num_examples})
