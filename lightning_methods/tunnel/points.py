"""Probe points of a backbone in forward order: one per weight layer, read after its nonlinearity (Masarczyk et al.,
*The Tunnel Effect*, NeurIPS 2023, arXiv 2305.19753: "every layer" = the output of each conv or FC layer).

Conventions (fixed across datasets, documented in docs/methods/tunnel.md):

- models with a ``probe_points()`` method (``mlp*``, ``vgg*_3fc``) list their own points: VGG-19 (``vgg19_3fc``)
  has 19 (16 conv + 3 FC), an MLP one per linear layer;
- ResNets (``resnet18/34/50`` with the CIFAR stem, and the CIFAR ResNets ``resnet8 ... resnet110``): the stem conv
  (after BN + ReLU), every conv of the residual path of every block in forward order; the conv that closes a block
  is read at the block output (after the residual sum and the final ReLU); the 1x1 projection convs of the
  shortcuts are not layers of the count (ResNet-34 = 33 conv + 1 FC). ResNet-34 yields 34 points;
- the package's ``vgg*`` (BN layout of the distillation zoo, 1 FC): every conv after BN + ReLU, then the classifier;
- any other model: every ``Conv2d`` / ``Linear`` in the order the forward pass calls them, read at the first
  activation module that follows it (skipping normalization layers); without one, at the module's own output.

The head (the output layer's logits) is included unless ``include_head=False``. Points can always be given
explicitly by module name (``"block0.3"``, or ``"block0.3:relu"`` to apply a ReLU to that module's output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_methods.analysis.features import ACTIVATIONS, ProbePoint, resolve_modules
from lightning_methods.models.cifar_resnet import BasicBlock as CifarBasicBlock
from lightning_methods.models.cifar_resnet import CifarResNet
from lightning_methods.models.resnet import BasicBlock, Bottleneck, ResNet
from lightning_methods.models.vgg import VGG

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
ACTS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Sigmoid)


def _resnet_points(model: nn.Module) -> list[tuple[str, str, str | None]]:
    stem_act = "relu" if isinstance(model, CifarResNet) else None
    points = [("stem_conv", "relu", None) if stem_act else ("stem_conv", "bn1", "relu")]
    stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
    for s, stage in enumerate(stages, 1):
        for b, block in enumerate(getattr(model, stage)):
            prefix = f"{stage}.{b}"
            if isinstance(block, CifarBasicBlock):
                inner = [(f"{prefix}.relu", None)]
            elif isinstance(block, Bottleneck):
                inner = [(f"{prefix}.bn1", "relu"), (f"{prefix}.bn2", "relu")]
            elif isinstance(block, BasicBlock):
                inner = [(f"{prefix}.bn1", "relu")]
            else:  # pragma: no cover - other block types use the generic rule
                raise TypeError(type(block).__name__)
            for c, (module, act) in enumerate(inner, 1):
                points.append((f"s{s}b{b}_conv{c}", module, act))
            points.append((f"s{s}b{b}_conv{len(inner) + 1}", prefix, None))
    head = "fc" if isinstance(model, CifarResNet) else "linear"
    return points + [("fc", head, None)]


def _vgg_bn_points(model: VGG) -> list[tuple[str, str, str | None]]:
    points = []
    for b in range(5):
        block = getattr(model, f"block{b}")
        mods = list(block.named_children())
        for i, (name, m) in enumerate(mods):
            if not isinstance(m, nn.Conv2d):
                continue
            after = mods[i + 1 : i + 3]
            relu = next((n for n, mm in after if isinstance(mm, nn.ReLU)), None)
            bn = next((n for n, mm in after if isinstance(mm, nn.BatchNorm2d)), name)
            module, act = (f"block{b}.{relu}", None) if relu is not None else (f"block{b}.{bn}", "relu")
            points.append((f"conv{len(points) + 1}", module, act))
    return points + [("fc", "classifier", None)]


#: enumerators for backbone classes without a ``probe_points()`` method (checked with ``isinstance`` in order)
ENUMERATORS: list[tuple[type, Callable[[nn.Module], list[tuple[str, str, str | None]]]]] = [
    (ResNet, _resnet_points),
    (CifarResNet, _resnet_points),
    (VGG, _vgg_bn_points),
]


def call_order(model: nn.Module, example: torch.Tensor, modules: dict[str, nn.Module] | None = None) -> list[str]:
    """Names of ``modules`` (default: all leaf modules) in the order one eval forward pass first calls them."""
    from lightning_methods.analysis.features import eval_mode

    modules = modules if modules is not None else {n: m for n, m in model.named_modules() if not list(m.children())}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: order.append(n) if n not in order else None)
               for n, m in modules.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _generic_points(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str, str | None]]:
    leaves = {n: m for n, m in model.named_modules() if not list(m.children())}
    order = call_order(model, example, leaves)
    points = []
    for i, name in enumerate(order):
        if not isinstance(leaves[name], (nn.Conv2d, nn.Linear)):
            continue
        read = name
        for nxt in order[i + 1 :]:
            if isinstance(leaves[nxt], NORMS):
                continue
            if isinstance(leaves[nxt], ACTS):
                read = nxt
            break
        kind = "conv" if isinstance(leaves[name], nn.Conv2d) else "fc"
        points.append((f"{kind}{sum(p[0].startswith(kind) for p in points) + 1}", read, None))
    return points


def parse_points(specs: Sequence[str]) -> list[ProbePoint]:
    """User-given points: ``"module"`` or ``"module:activation"`` (the module name is also the point's name)."""
    out = []
    for spec in specs:
        module, _, act = spec.partition(":")
        if act and act not in ACTIVATIONS:
            raise ValueError(f"probe point {spec!r}: activation after ':' must be one of {sorted(ACTIVATIONS)}")
        out.append(ProbePoint(spec, module, act or None))
    return out


def probe_points(model: nn.Module, names: Sequence[str] | None = None, include_head: bool = True,
                 example: torch.Tensor | None = None) -> list[ProbePoint]:
    """The probe points of ``model`` in forward order.

    Args:
        model: the backbone (the module whose forward maps images to logits).
        names: explicit module names (``"module"`` or ``"module:relu"``) instead of the default enumeration.
        include_head: keep the output layer (logits) as the last point.
        example: an input batch for the forward pass that checks the order (default: one 3x32x32 image).

    Returns:
        The points sorted by the order in which the forward pass reaches them.

    Raises:
        ValueError: an unknown module name (with close matches), a duplicate, or a module the forward never runs.
    """
    example = example if example is not None else torch.zeros(1, 3, 32, 32)
    if names:
        points = parse_points(names)
    else:
        if hasattr(model, "probe_points"):
            raw = model.probe_points()
        else:
            enum = next((fn for cls, fn in ENUMERATORS if isinstance(model, cls)), None)
            raw = enum(model) if enum is not None else _generic_points(model, example.to(_device(model)))
        if not include_head:
            raw = raw[:-1]
        points = [ProbePoint(*p) for p in raw]
    modules = resolve_modules(model, points)
    by_module = {p.module: p for p in points}
    order = call_order(model, example.to(_device(model)), {p.module: modules[p.name] for p in points})
    never = [p.module for p in points if p.module not in order]
    if never:
        raise ValueError(f"probe points {never} are never run by {type(model).__name__}.forward; choose modules on "
                         "the forward path")
    if len(by_module) != len(points):
        raise ValueError("two probe points read the same module; give each module once")
    return [by_module[m] for m in order]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
