"""Parameter roles and BatchNorm helpers shared by the classifier and the optimizers.

Roles are found by module type, never by parameter name:

- ``"norm"``: affine parameters of normalization layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm and
  their subclasses, and every layer of timm's norm modules, e.g. timm's RmsNorm and SimpleNorm). Two groups:
  ``scale=True`` (gamma) and ``scale=False`` (beta).
- ``"bias"``: other parameters with one dimension or fewer (biases of convolutions and linear layers).
- ``"weight"``: everything else (conv / linear weights, embeddings, tokens).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

_TORCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    _InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


#: timm's modules that define only normalization layers (some subclass no torch norm: RmsNorm, RmsNormFp32,
#: SimpleNorm, SimpleNorm2d, ..., the gamma of RMS-normalized ViTs)
_TIMM_NORM_MODULES = ("timm.layers.norm", "timm.layers.norm_act")


def norm_types() -> tuple[type[nn.Module], ...]:
    """The normalization layer types: torch's, plus every layer class that timm's norm modules define, when timm is
    loaded. A timm layer can only exist once timm is imported, so this never imports timm itself and the optimizers
    stay free of timm's import cost."""
    extra: list[type[nn.Module]] = []
    for name in _TIMM_NORM_MODULES:
        module = sys.modules.get(name)
        extra += [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, nn.Module)
                  and c.__module__ == name and not issubclass(c, _TORCH_NORM_TYPES)] if module else []
    return _TORCH_NORM_TYPES + tuple(extra)


def __getattr__(name: str):  # NORM_TYPES is computed on access: it depends on whether timm is loaded
    if name == "NORM_TYPES":
        return norm_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ROLES = ("weight", "bias", "norm")


def parameter_roles(model: nn.Module) -> dict[nn.Parameter, tuple[str, bool]]:
    """Map every trainable parameter of ``model`` to ``(role, is_norm_scale)``.

    A parameter shared by several modules gets the role of the first module that owns it.
    """
    roles: dict[nn.Parameter, tuple[str, bool]] = {}
    types = norm_types()
    for module in model.modules():
        is_norm = isinstance(module, types)
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or p in roles:
                continue
            if is_norm:
                # gamma is the parameter called "weight" by every torch / timm norm layer; "bias" is beta
                roles[p] = ("norm", pname != "bias")
            else:
                roles[p] = ("bias" if p.ndim <= 1 else "weight", False)
    return roles


def param_groups_by_role(
    model: nn.Module, weight_decay: float | None = None, no_weight_decay_roles: tuple[str, ...] | list[str] = ()
) -> list[dict]:
    """Parameter groups tagged with ``"role"`` (and ``"scale"`` for norm groups), empty groups dropped.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: if given, written into every group (so groups can differ).
        no_weight_decay_roles: roles whose groups get ``weight_decay = 0``.
    """
    unknown = set(no_weight_decay_roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown parameter role(s) {sorted(unknown)} in no_weight_decay_roles; roles are {ROLES}")
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for p, key in parameter_roles(model).items():
        buckets.setdefault(key, []).append(p)
    groups = []
    for role, scale in (("weight", False), ("bias", False), ("norm", True), ("norm", False)):
        params = buckets.get((role, scale))
        if not params:
            continue
        group: dict = {"params": params, "role": role}
        if role == "norm":
            group["scale"] = scale
        if role in no_weight_decay_roles:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Inside this context, BatchNorm layers in train mode normalize with batch statistics but leave
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched (exactly, whatever the momentum).

    Used for the second and later forward passes of one optimization step (SAM's descent pass).
    """
    changed = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats and m.training]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True
