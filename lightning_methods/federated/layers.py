"""Layers as FedFree sees them: the inventory of a model's Conv2d / Linear layers, per-layer parameter change
(Eq. 2), top-k critical-layer selection and the type-and-depth mapping of client layers onto global layers.

Du et al., "FedFree: Breaking Knowledge-sharing Barriers through Layer-wise Alignment in Heterogeneous Federated
Learning" (NeurIPS 2025; OpenReview G10Y4vrhGF; no arXiv id). A "layer" is a Conv2d or Linear module (weight and
bias); BatchNorm and other layers are never uploaded (our choice, the paper leaves it open).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

LAYER_KINDS: dict[type[nn.Module], str] = {nn.Conv2d: "conv", nn.Linear: "linear"}


@dataclass(frozen=True)
class LayerSpec:
    """One Conv2d / Linear layer of a model: what the server needs to run it on pseudo-data and to map it.

    Attributes:
        name: qualified module name (``"base.layer1.0.conv1"``); its parameters are ``name + ".weight"`` / ``".bias"``.
        kind: ``"conv"`` or ``"linear"`` (layers are only compared with layers of the same kind).
        index: position among the model's layers of the same kind, in module order (depth).
        count: number of layers of that kind in the model.
        in_features: input channels / features.
        out_features: output channels / features.
        kernel, stride, padding, dilation: conv geometry ((1, 1), (1, 1), (0, 0), (1, 1) for Linear).
        groups: conv groups (1 for Linear).
        bias: whether the layer has a bias.
        input_size: spatial size (H, W) of the layer's input when the model runs on its native input; ``None`` for
            Linear layers and for layers the traced forward pass does not reach.
    """

    name: str
    kind: str
    index: int
    count: int
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    input_size: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerSpec:
        data = dict(data)
        for key in ("kernel", "stride", "padding", "dilation", "input_size"):
            if data.get(key) is not None:
                data[key] = tuple(int(v) for v in data[key])
        return cls(**data)


def specs_to_json(specs: Sequence[LayerSpec]) -> str:
    """Serialize specs as a JSON string (travels in Flower ConfigRecords, which hold scalars and strings)."""
    return json.dumps([s.to_dict() for s in specs])


def specs_from_json(text: str) -> list[LayerSpec]:
    return [LayerSpec.from_dict(d) for d in json.loads(text)]


def layer_specs(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32)) -> list[LayerSpec]:
    """Inventory of the Conv2d / Linear layers of ``model`` in module order, with traced input sizes.

    One forward pass on a zero input of shape ``(1, *input_shape)`` (in eval mode, without gradients; the model's
    mode is restored) records the spatial input size of every conv layer.
    """
    modules = [(n, m) for n, m in model.named_modules() if type(m) in LAYER_KINDS]
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input is left unchanged
            sizes.setdefault(name, tuple(args[0].shape[-2:]))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in modules if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    counts = {k: sum(LAYER_KINDS[type(m)] == k for _, m in modules) for k in LAYER_KINDS.values()}
    seen = dict.fromkeys(counts, 0)
    specs = []
    for name, m in modules:
        kind = LAYER_KINDS[type(m)]
        common = dict(name=name, kind=kind, index=seen[kind], count=counts[kind], bias=m.bias is not None)
        seen[kind] += 1
        if kind == "conv":
            specs.append(LayerSpec(in_features=m.in_channels, out_features=m.out_channels, kernel=tuple(m.kernel_size),
                                   stride=tuple(m.stride), padding=tuple(m.padding), dilation=tuple(m.dilation),
                                   groups=m.groups, input_size=sizes.get(name), **common))
        else:
            specs.append(LayerSpec(in_features=m.in_features, out_features=m.out_features, **common))
    return specs


def layer_params(state: Mapping[str, torch.Tensor], spec: LayerSpec) -> dict[str, torch.Tensor]:
    """``{"weight": ..., "bias": ...}`` of one layer from a state dict (no bias key when the layer has none)."""
    out = {"weight": state[f"{spec.name}.weight"]}
    if spec.bias:
        out["bias"] = state[f"{spec.name}.bias"]
    return out


def layer_deltas(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], specs: Sequence[LayerSpec],
                 normalization: str = "none") -> torch.Tensor:
    """Eq. 2: the L2 norm of each layer's parameter change (weight and bias together), in float64.

    Args:
        before, after: state dicts of the client model before and after local training.
        specs: the layers (their order is the order of the result).
        normalization: ``"none"`` (the paper: raw L2, which favours big layers), ``"count"`` (divided by the
            number of parameters) or ``"sqrt_count"`` (root-mean-square change).
    """
    if normalization not in ("none", "count", "sqrt_count"):
        raise ValueError(f"delta normalization must be 'none', 'count' or 'sqrt_count', got {normalization!r}")
    out = []
    for spec in specs:
        sq, numel = 0.0, 0
        for key in layer_params(after, spec):
            # one float64 buffer, updated in place: the float32 operand is promoted exactly, and x * x is what
            # pow(x, 2) computes, so the value equals (after.double() - before.double()).pow(2).sum() bit for bit
            diff = after[f"{spec.name}.{key}"].double()
            diff.sub_(before[f"{spec.name}.{key}"].to(diff.device))
            sq += float(diff.mul_(diff).sum())
            numel += diff.numel()
        delta = math.sqrt(sq)
        if normalization == "count":
            delta /= numel
        elif normalization == "sqrt_count":
            delta /= math.sqrt(numel)
        out.append(delta)
    return torch.tensor(out, dtype=torch.float64)


def select_critical_layers(deltas: torch.Tensor, specs: Sequence[LayerSpec], k: int) -> list[LayerSpec]:
    """The ``k`` layers with the largest change (ties broken by layer order), returned in layer order.

    Raises:
        ValueError: if ``k`` is not in ``[1, number of layers]``.
    """
    if len(deltas) != len(specs):
        raise ValueError(f"got {len(deltas)} deltas for {len(specs)} layers")
    if not 1 <= k <= len(specs):
        raise ValueError(f"k={k} critical layers requested but the model has {len(specs)} Conv2d/Linear layers; "
                         f"set k between 1 and {len(specs)}")
    order = sorted(range(len(specs)), key=lambda i: (-float(deltas[i]), i))
    return [specs[i] for i in sorted(order[:k])]


def map_layer_index(l: int, num_local: int, num_global: int) -> int:
    """Depth mapping among same-kind layers: local ``l`` of ``L`` -> global ``round(l / (L - 1) * (J - 1))``.

    Rounds half up (``floor(x + 0.5)``, our choice; Python's ``round`` rounds half to even). Endpoints map to
    endpoints and the map is monotone in ``l``. A lone layer (``L = 1``, where the formula is undefined) maps to the
    last global layer ``J - 1`` (our choice: a client's only Linear layer is its classifier, which then meets the
    global classifier).
    """
    if num_local < 1 or num_global < 1 or not 0 <= l < num_local:
        raise ValueError(f"need 0 <= l < L and J >= 1, got l={l}, L={num_local}, J={num_global}")
    if num_local == 1:
        return num_global - 1
    return math.floor(l / (num_local - 1) * (num_global - 1) + 0.5)


def map_to_global(spec: LayerSpec, global_specs: Sequence[LayerSpec]) -> LayerSpec:
    """The global layer a client layer is distilled into: same kind, approximate depth (:func:`map_layer_index`).

    Raises:
        ValueError: if the global model has no layer of that kind.
    """
    same = [g for g in global_specs if g.kind == spec.kind]
    if not same:
        raise ValueError(f"the global model has no {spec.kind} layer to receive client layer {spec.name!r}")
    return same[map_layer_index(spec.index, spec.count, len(same))]
