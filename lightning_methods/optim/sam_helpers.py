"""Helpers of the SAM family (arXiv 2010.01412, 2102.11600, 2306.04226): parameter roles of the optimizer's groups and
a closure for plain PyTorch training loops."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_methods.parameters import frozen_bn_stats, parameter_roles

Roles = dict[torch.Tensor, tuple[str | None, bool | None]]


def check_arguments(*, rho: float, perturb: str, adaptive: str | None, eta: float, xi: float, every_k: int,
                    prob: float, start: int, end: int | None, freeze: bool, base_optimizer: object) -> None:
    """Clear errors for invalid arguments of :class:`lightning_methods.optim.SAM`."""
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    if perturb not in ("all", "only_norm", "no_norm"):
        raise ValueError(f"perturb must be 'all', 'only_norm' or 'no_norm', got {perturb!r}")
    if adaptive not in (None, "elementwise", "layerwise"):
        raise ValueError(f"adaptive must be None, 'elementwise' or 'layerwise', got {adaptive!r}")
    if eta < 0 or xi < 0:
        raise ValueError(f"eta and xi must be >= 0, got eta={eta}, xi={xi}")
    if every_k < 1:
        raise ValueError(f"sam_every_k must be >= 1, got {every_k}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"sam_probability must be in (0, 1], got {prob}")
    if end is not None and end <= start:
        raise ValueError(f"sam_end_epoch ({end}) must be > sam_start_epoch ({start})")
    if freeze and perturb != "only_norm":
        raise ValueError("freeze_non_norm_pass1=True needs perturb='only_norm' (SAM-ON): pass 1 then only needs the "
                         "gradients of the normalization parameters")
    if not callable(base_optimizer):
        raise TypeError(f"base_optimizer must be a callable params -> Optimizer, got {type(base_optimizer)}")


def resolve_roles(groups: Iterable[dict], model: nn.Module | None, need_roles: bool, need_scale: bool,
                  owner: str) -> Roles:
    """``{parameter: (role, is_norm_scale)}`` from the groups' ``"role"`` / ``"scale"`` tags, else from ``model``
    (module types, ``lightning_methods.parameters.parameter_roles``).

    Raises ``ValueError`` naming ``owner`` when roles (or the scale flag of norm parameters) are needed but missing.
    """
    from_model = parameter_roles(model) if model is not None else {}
    roles: Roles = {}
    for group in groups:
        for q in group["params"]:
            role, scale = group.get("role"), group.get("scale")
            if role is None or (role == "norm" and scale is None):
                role, scale = from_model.get(q, (role, scale))
            roles[q] = (role, scale if role == "norm" else False)
    if need_roles and any(r is None for r, _ in roles.values()):
        raise ValueError(
            f"{owner} selects parameters by role, but some parameters have none. Pass role-tagged groups "
            "(lightning_methods.param_groups_by_role(model), as ImageClassifier does; roles 'weight', 'bias', 'norm') "
            "or model=<the module> so roles can be found by module type."
        )
    if need_scale and any(r == "norm" and s is None for r, s in roles.values()):
        raise ValueError(f"{owner}: ASAM needs norm groups tagged with 'scale' (True for gamma, False for beta); pass "
                         "model=<the module> or groups from lightning_methods.param_groups_by_role")
    return roles


def sam_closure(model: nn.Module, compute_loss: Callable[[], torch.Tensor], optimizer: Any = None
                ) -> Callable[[], torch.Tensor]:
    """A closure for plain PyTorch loops: ``opt.step(sam_closure(model, lambda: loss_fn(model(x), y), opt))``.

    Each call zeroes the gradients, evaluates ``compute_loss()`` and back-propagates it; calls after the first leave
    BatchNorm running statistics untouched (``frozen_bn_stats``). Returns the detached loss. Build one per step.
    With ``optimizer`` given and ``model`` the ``DistributedDataParallel`` wrapper that ``compute_loss`` runs, the
    call the optimizer marks ``pass1_local`` (SAM's ``m_sharpness``) runs under ``model.no_sync()``: local gradients.
    """
    calls = [0]

    def closure() -> torch.Tensor:
        local = getattr(optimizer, "pass1_local", False) and hasattr(model, "no_sync")
        ctx = frozen_bn_stats(model) if calls[0] > 0 else contextlib.nullcontext()
        calls[0] += 1
        with ctx, (model.no_sync() if local else contextlib.nullcontext()):
            loss = compute_loss()
            model.zero_grad(set_to_none=True)
            loss.backward()
        return loss.detach()

    return closure
