"""FedFree: critical-layer upload, reverse layer-wise knowledge transfer on Gaussian pseudo-data, KGE alignment.

Du, Xiang, Cai, Liu, Wu, Huo, Long, "FedFree: Breaking Knowledge-sharing Barriers through Layer-wise Alignment in
Heterogeneous Federated Learning" (NeurIPS 2025; OpenReview G10Y4vrhGF; no arXiv id). One round:

1. each client trains locally, ranks its Conv2d / Linear layers by the L2 norm of their change (Eq. 2) and uploads
   the top ``k`` (:mod:`.layers`);
2. the server maps every uploaded layer onto the global CNN's layer of the same kind and approximate depth and trains
   each global layer to reproduce the outputs of its mapped client layers on Gaussian pseudo-data (Eqs. 3-5,
   :mod:`.distill`);
3. for each client, the pair (uploaded layer, global layer of the same kind) with the largest positive Knowledge Gain
   Entropy ``H(global) - H(local)`` (Eq. 6) is chosen, and the global layer overwrites the local one by a flattened
   prefix copy (Eq. 7, :mod:`.kge`); clients without a positive KGE receive nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from lightning_methods.federated.algorithm import (
    ClientInfo,
    FedAlgorithm,
    FederationInfo,
    Payload,
    build_net,
    cpu_state,
)
from lightning_methods.federated.distill import distill_layer
from lightning_methods.federated.kge import histogram_entropy, kge_select, project_layer
from lightning_methods.federated.layers import (
    LayerSpec,
    layer_deltas,
    layer_params,
    layer_specs,
    map_to_global,
    select_critical_layers,
)
from lightning_methods.utils import seeded_generator


class FedFree(FedAlgorithm):
    """The FedFree algorithm object (server and client side).

    Args:
        k: critical layers uploaded per client and round (paper: 2; sensitivity k in {1, 2, 3}).
        server_lr: learning rate alpha of the server's distillation steps (paper: 0.01).
        server_steps: gradient steps per global layer and round (our choice: 5; the paper does not say).
        pseudo_batch_size: pseudo-data batch n (our choice: 64).
        pseudo_spatial: spatial size of conv pseudo-data; ``None`` = each global layer's native input size.
        bins: histogram bins of the entropy (paper: 256).
        projection_fill: remaining local entries after the prefix copy: ``"keep"`` (our default) or ``"zero"``.
        delta_normalization: ``"none"`` (paper: raw L2), ``"count"`` or ``"sqrt_count"``.
        distill_reduction: Eq. 3's squared norm summed over output units and averaged over pseudo-samples and
            positions (``"sum_units"``, our default: a step moves a layer ``2 alpha`` of the way to its clients' mean)
            or an elementwise mean (``"mean"``); see :mod:`.distill`.
        kge_candidates: global layers a client layer may receive: every global layer of the same kind (``"all"``,
            the paper's rule as the spec reads Eq. 6) or only the one it was distilled into (``"mapped"``: the
            classifier meets the classifier, early convs meet early convs).
        global_family: the server's global model (paper: the 2 conv + 3 FC CNN, ``fed_cnn``).
    """

    name = "fedfree"

    def __init__(self, k: int = 2, server_lr: float = 0.01, server_steps: int = 5, pseudo_batch_size: int = 64,
                 pseudo_spatial: int | None = None, bins: int = 256, projection_fill: Literal["keep", "zero"] = "keep",
                 delta_normalization: Literal["none", "count", "sqrt_count"] = "none",
                 distill_reduction: Literal["sum_units", "mean"] = "sum_units",
                 kge_candidates: Literal["all", "mapped"] = "all", global_family: str = "fed_cnn") -> None:
        if k < 1:
            raise ValueError(f"k (critical layers per client) must be >= 1, got {k}")
        if projection_fill not in ("keep", "zero"):
            raise ValueError(f"projection_fill must be 'keep' or 'zero', got {projection_fill!r}")
        if delta_normalization not in ("none", "count", "sqrt_count"):
            raise ValueError(f"delta_normalization must be 'none', 'count' or 'sqrt_count', got "
                             f"{delta_normalization!r}")
        if server_steps < 0 or server_lr < 0 or pseudo_batch_size < 1 or bins < 2:
            raise ValueError("need server_steps >= 0, server_lr >= 0, pseudo_batch_size >= 1 and bins >= 2")
        self.k, self.server_lr, self.server_steps = k, server_lr, server_steps
        self.pseudo_batch_size, self.pseudo_spatial, self.bins = pseudo_batch_size, pseudo_spatial, bins
        self.projection_fill, self.delta_normalization = projection_fill, delta_normalization
        if distill_reduction not in ("sum_units", "mean"):
            raise ValueError(f"distill_reduction must be 'sum_units' or 'mean', got {distill_reduction!r}")
        if kge_candidates not in ("all", "mapped"):
            raise ValueError(f"kge_candidates must be 'all' or 'mapped', got {kge_candidates!r}")
        self.global_family, self.distill_reduction = global_family, distill_reduction
        self.kge_candidates = kge_candidates
        self._specs: dict[str, list[LayerSpec]] = {}

    # ------------------------------------------------------------------------------------------ server side
    def setup_server(self, info: FederationInfo) -> None:
        super().setup_server(info)
        net = build_net(self.global_family, info, self.global_seed(), info.feature_dim, info.stem)
        self.global_specs = layer_specs(net, (3, info.image_size, info.image_size))
        self.global_state = cpu_state(net)

    def server_state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state}

    def load_server_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_state = {k: v.clone() for k, v in state["global_state"].items()}

    def aggregate(self, round: int, uploads: Mapping[int, Payload]) -> dict[str, Any]:
        teachers: dict[str, list[tuple[dict[str, torch.Tensor], LayerSpec]]] = {g.name: [] for g in self.global_specs}
        local: dict[int, list[tuple[LayerSpec, dict[str, torch.Tensor]]]] = {}
        mapped: dict[int, dict[str, list[str]]] = {}
        for cid in sorted(uploads):
            payload = uploads[cid]
            local[cid], mapped[cid] = [], {}
            for spec in (LayerSpec.from_dict(d) for d in payload.meta["specs"]):
                params = layer_params(payload.arrays, spec)
                target = map_to_global(spec, self.global_specs).name
                teachers[target].append((params, spec))
                local[cid].append((spec, params))
                mapped[cid][spec.name] = [target]
        first, last, distilled = [], [], []
        for j, g in enumerate(self.global_specs):
            if not teachers[g.name]:
                continue
            new, losses = distill_layer(layer_params(self.global_state, g), g, teachers[g.name],
                                        steps=self.server_steps, lr=self.server_lr,
                                        batch_size=self.pseudo_batch_size,
                                        generator=seeded_generator(self.info.seed, round, j),
                                        spatial=self.pseudo_spatial, reduction=self.distill_reduction)
            for key, value in new.items():
                self.global_state[f"{g.name}.{key}"] = value
            distilled.append(g.name)
            if losses:
                first.append(losses[0])
                last.append(losses[-1])
        h_global = {g.name: histogram_entropy(self.global_state[f"{g.name}.weight"], self.bins)
                    for g in self.global_specs}
        aligned: dict[int, str] = {}
        for cid, layers in local.items():
            h_local = {s.name: histogram_entropy(p["weight"], self.bins) for s, p in layers}
            choice = kge_select(h_local, [s for s, _ in layers], h_global, self.global_specs,
                                mapped[cid] if self.kge_candidates == "mapped" else None)
            if choice is None:
                continue
            g = next(s for s in self.global_specs if s.name == choice.global_name)
            self.pending[cid] = Payload(layer_params(self.global_state, g),
                                        {"local_name": choice.local_name, "global_name": choice.global_name,
                                         "kge": choice.kge})
            aligned[cid] = f"{choice.local_name}<-{choice.global_name}"
        return {"server/distill_loss_first": sum(first) / len(first) if first else 0.0,
                "server/distill_loss": sum(last) / len(last) if last else 0.0,
                "server/layers_distilled": len(distilled), "server/clients_aligned": len(aligned),
                "aligned": aligned}

    # ------------------------------------------------------------------------------------------ client side
    def client_specs(self, net: nn.Module, family: str, image_size: int = 32) -> list[LayerSpec]:
        """The client's layer inventory (traced once per family on ``image_size`` inputs and cached)."""
        if family not in self._specs:
            self._specs[family] = layer_specs(net, (3, image_size, image_size))
        return self._specs[family]

    def validate_client(self, net: nn.Module, info: ClientInfo) -> None:
        specs = self.client_specs(net, info.family, info.image_size)
        if self.k > len(specs):
            raise ValueError(f"k={self.k} critical layers requested but client family {info.family} has only "
                             f"{len(specs)} Conv2d/Linear layers; lower algorithm.init_args.k")

    def apply_download(self, net: nn.Module, extra: dict[str, Any], payload: Payload, info: ClientInfo) -> None:
        name = payload.meta["local_name"]
        spec = next(s for s in self.client_specs(net, info.family, info.image_size) if s.name == name)
        state = net.state_dict()
        new = project_layer(payload.arrays, layer_params(state, spec), self.projection_fill)
        with torch.no_grad():
            for key, value in new.items():
                state[f"{name}.{key}"].copy_(value)

    def upload(self, before: Mapping[str, torch.Tensor], net: nn.Module, extra: dict[str, Any],
               info: ClientInfo) -> Payload:
        self.validate_client(net, info)
        specs = self.client_specs(net, info.family, info.image_size)
        # the live weights on the CPU (no copy of the whole model: only the k uploaded layers are cloned, since the
        # network is shared by the clients of its family)
        after = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        deltas = layer_deltas(before, after, specs, self.delta_normalization)
        chosen = select_critical_layers(deltas, specs, self.k)
        arrays = {f"{s.name}.{key}": value.clone() for s in chosen for key, value in layer_params(after, s).items()}
        return Payload(arrays, {"num_examples": info.num_examples, "specs": [s.to_dict() for s in chosen],
                                "deltas": {s.name: float(deltas[specs.index(s)]) for s in chosen}})
