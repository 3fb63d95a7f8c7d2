"""Sharpness-Aware Minimization and its perturbation variants as one torch optimizer wrapping a base optimizer.

- Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*, ICLR 2021, arXiv 2010.01412.
- Kwon et al., *ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks*,
  ICML 2021, arXiv 2102.11600.
- Mueller et al., *Normalization Layers Are All That Sharpness-Aware Minimization Needs* (SAM-ON), NeurIPS 2023,
  arXiv 2306.04226.

One step (``step(closure)``, the closure contract of ARCHITECTURE.md): evaluate the closure at ``w`` (pass 1), perturb
the selected set ``S`` by ``eps``, evaluate the closure at ``w + eps`` (pass 2), copy ``w`` back (exact restore, never
``p -= eps``) and let the base optimizer step with the pass-2 gradients of all parameters. The loss of pass 1 is
returned. Variants differ only in ``S`` (``perturb``) and in the shape of ``eps`` (``adaptive``, ``p``):

- p = 2: ``eps_i = rho * T_i * u_i / (||u||_S + xi)`` with ``u_i = T_i * g_i``; the norm runs over ``S`` only.
- p = inf: ``eps_i = rho * T_i * sign(g_i)`` (no normalization).
- ``T_i = 1`` (SAM), ``|w_i| + eta`` (ASAM elementwise) or ``||w_i||_2 * (1 + eta)`` (ASAM layerwise, the operator
  precedence of the official SAM-ON code), applied to role ``"weight"`` and norm scales (gamma); biases and norm
  shifts (beta) keep ``T = 1`` unless ``normalize_bias``.

Parameters are selected by the roles of ``lightning_methods.parameters`` (module type, never names).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim import Optimizer

from lightning_methods.optim.sam_helpers import check_arguments, resolve_roles, sam_closure  # noqa: F401  (sam_closure re-exported)
from lightning_methods.utils.distributed import is_distributed

Perturb = Literal["all", "only_norm", "no_norm"]
Adaptive = Literal["elementwise", "layerwise"]


def _math(g: torch.Tensor) -> torch.Tensor:
    """``g`` in the dtype of the perturbation math: at least fp32, fp64 for fp64 parameters."""
    return g.to(torch.promote_types(g.dtype, torch.float32))


def _parse_p(p: float | str) -> float:
    if isinstance(p, str) and p.lower() in ("inf", "infinity"):
        return math.inf
    if float(p) in (2.0, math.inf):
        return float(p)
    raise ValueError(f"p must be 2 or 'inf' (the perturbation norm), got {p!r}")


class SAM(Optimizer):
    """SAM / ASAM / SAM-ON / ASAM-ON: a two-pass optimizer wrapping a base optimizer.

    Args:
        params: parameters or parameter groups; role-tagged groups (``"role"``, ``"scale"``) as
            ``ImageClassifier.parameter_groups()`` gives them select the perturbed set.
        base_optimizer: callable ``param_groups -> Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``,
            or a class such as ``torch.optim.SGD`` together with ``**base_kwargs``). It receives this optimizer's
            param groups and shares them, so schedulers attached to the wrapper drive the base optimizer.
        rho: radius of the neighbourhood (not comparable across variants: set it per variant).
        perturb: ``"all"`` parameters, ``"only_norm"`` (SAM-ON: affine parameters of normalization layers) or
            ``"no_norm"`` (every parameter except those).
        adaptive: ``None`` (SAM), ``"elementwise"`` or ``"layerwise"`` (ASAM's normalization operator ``T``).
        p: 2 or ``"inf"``: the norm of the neighbourhood.
        eta: ASAM's ``eta`` in ``T = |w| + eta`` (elementwise) or ``||w|| (1 + eta)`` (layerwise).
        normalize_bias: ASAM: apply ``T`` to biases and norm shifts too (official SAM-ON flag; with ``eta = 0`` it
            reproduces davda54's ``adaptive=True``).
        xi: stability constant added to the norm (1e-12 davda54, 1e-16 ASAM / SAM-ON, 1e-7 SSAM).
        sam_every_k: take the two-pass step only on every k-th step (plain base steps otherwise, LookSAM-style
            periodic schedule without gradient reuse).
        sam_probability: take the two-pass step with this probability (SS-SAM's Bernoulli schedule); draws are
            seeded by ``(sam_seed, step)``, hence identical on every rank and after resume.
        sam_seed: seed of those draws.
        sam_start_epoch, sam_end_epoch: plain base steps outside ``[start, end)`` (SAM-ON ``--start_sam/--end_sam``);
            the epoch comes from ``set_epoch`` (``lightning_methods.callbacks.SAMEpochSync`` calls it).
        freeze_non_norm_pass1: SAM-ON speed-up: in pass 1 only the perturbed normalization parameters require
            gradients, so the weight-gradient GEMMs of every other layer are skipped (single device only).
        m_sharpness: under DDP, run pass 1 of a two-pass step without the gradient all-reduce, so every device
            perturbs its weights by the gradient of its own batch and the norm of that gradient (SAM's m-sharpness
            with m = the per-device batch size, Foret et al. section 4.1; davda54's DDP recipe); pass 2 is
            all-reduced as usual, so the base step and the weights stay identical on every rank. The optimizer sets
            ``pass1_local`` while it evaluates pass 1; the closure must then skip the all-reduce (``ImageClassifier``
            and :func:`sam_closure` with the DDP-wrapped model do). No effect in a single process.
        model: the module owning ``params``; needed only when plain parameters without roles are given to a mode
            that selects by role (``only_norm``, ``no_norm``, ASAM without ``normalize_bias``).
        **base_kwargs: keyword arguments for ``base_optimizer``.

    BatchNorm: the closure runs twice per step, and a BatchNorm layer in training mode updates its running
    statistics on every forward. ``ImageClassifier`` freezes them in the second pass (``frozen_bn_stats``), as the
    official SAM-ON code does; in a plain LightningModule or loop they are updated in both passes unless the closure
    is built with :func:`sam_closure` (or the second call runs inside :func:`lightning_methods.frozen_bn_stats`).
    The first two-pass step checks this and warns once when the second pass updated them.
    """

    supports_grad_scaler = False  # two closure evaluations per step: a GradScaler cannot serve it (16-mixed refused)

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[[Iterable[Any]], Optimizer],
        rho: float = 0.1,
        perturb: Perturb = "all",
        adaptive: Adaptive | None = None,
        p: float | str = 2,
        eta: float = 0.01,
        normalize_bias: bool = False,
        xi: float = 1e-12,
        sam_every_k: int = 1,
        sam_probability: float = 1.0,
        sam_seed: int = 0,
        sam_start_epoch: int = 0,
        sam_end_epoch: int | None = None,
        freeze_non_norm_pass1: bool = False,
        m_sharpness: bool = False,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_arguments(rho=rho, perturb=perturb, adaptive=adaptive, eta=eta, xi=xi, every_k=sam_every_k,
                        prob=sam_probability, start=sam_start_epoch, end=sam_end_epoch, freeze=freeze_non_norm_pass1,
                        base_optimizer=base_optimizer)
        super().__init__(params, dict(rho=rho))
        self.perturb, self.adaptive, self.p = perturb, adaptive, _parse_p(p)
        self.eta, self.normalize_bias, self.xi = eta, normalize_bias, xi
        self.sam_every_k, self.sam_probability, self.sam_seed = sam_every_k, sam_probability, sam_seed
        self.sam_start_epoch, self.sam_end_epoch = sam_start_epoch, sam_end_epoch
        self.freeze_non_norm_pass1, self.m_sharpness = freeze_non_norm_pass1, bool(m_sharpness)
        self.pass1_local = False  # True while pass 1 of an m-sharpness step runs: the closure skips the all-reduce
        self._roles = self._resolve_roles(model)
        if perturb == "only_norm" and not any(role == "norm" for role, _ in self._roles.values()):
            raise ValueError(f"{type(self).__name__} perturbs only the affine parameters of normalization layers "
                             "(perturb='only_norm'), and the model has none: it would be plain SGD at twice the cost. "
                             "Use SAM / ASAM (perturb='all') for models without normalization layers.")
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(self.base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer returned {type(self.base_optimizer).__name__}, not a torch Optimizer")
        self.param_groups = self.base_optimizer.param_groups  # shared: schedulers on the wrapper drive the base
        self.steps = 0  # step() calls so far (drives sam_every_k / sam_probability; saved in state_dict)
        self.epoch: int | None = None
        self.last_step_was_sam = False
        self.last_perturbed_loss: Any = None
        self._old: dict[torch.Tensor, torch.Tensor] = {}  # pass-1 weights of the perturbed set (not checkpointed)
        self._bn_check_pending = True  # the first two-pass step checks the BatchNorm statistics (warns once)
        self._perturbed: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------------------- roles
    def _needs_roles(self) -> bool:
        return self.perturb != "all" or (self.adaptive is not None and not self.normalize_bias)

    def _resolve_roles(self, model: nn.Module | None) -> dict[torch.Tensor, tuple[str | None, bool | None]]:
        return resolve_roles(self.param_groups, model, self._needs_roles(), self._needs_scale(),
                             f"{type(self).__name__}(perturb={self.perturb!r}, adaptive={self.adaptive!r})")

    def _needs_scale(self) -> bool:
        return self.adaptive is not None and not self.normalize_bias

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during __init__
            super().add_param_group(param_group)
            return
        param_group.setdefault("rho", self.defaults["rho"])
        roles = resolve_roles([param_group], None, self._needs_roles(), self._needs_scale(), "add_param_group")
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list
        self._roles.update(roles)

    def is_perturbed(self, q: torch.Tensor) -> bool:
        """Whether parameter ``q`` belongs to the perturbed set (by role)."""
        if self.perturb == "all":
            return True
        is_norm = self._roles[q][0] == "norm"
        return is_norm if self.perturb == "only_norm" else not is_norm

    def perturbed_parameters(self) -> list[torch.Tensor]:
        return [q for g in self.param_groups for q in g["params"] if self.is_perturbed(q)]

    def _scaled(self, q: torch.Tensor) -> bool:
        role, scale = self._roles[q]
        return self.normalize_bias or role == "weight" or (role == "norm" and bool(scale))

    # ------------------------------------------------------------------------------------------- schedule
    def set_epoch(self, epoch: int) -> None:
        """Tell the optimizer the current epoch (for ``sam_start_epoch`` / ``sam_end_epoch``)."""
        self.epoch = int(epoch)

    def sam_this_step(self) -> bool:
        """Whether the next ``step`` is a two-pass SAM step (deterministic in the step count and epoch)."""
        if self.sam_start_epoch > 0 or self.sam_end_epoch is not None:
            if self.epoch is None:
                raise RuntimeError(
                    "sam_start_epoch / sam_end_epoch need the current epoch: call optimizer.set_epoch(epoch) every "
                    "epoch, or add the callback lightning_methods.callbacks.SAMEpochSync to the Trainer"
                )
            end = math.inf if self.sam_end_epoch is None else self.sam_end_epoch
            if not self.sam_start_epoch <= self.epoch < end:
                return False
        if self.steps % self.sam_every_k != 0:
            return False
        if self.sam_probability < 1.0:
            return bool(np.random.default_rng([self.sam_seed, self.steps]).random() < self.sam_probability)
        return True

    # ------------------------------------------------------------------------------------------- the step
    def _perturbation(self, items: list[tuple[dict, torch.Tensor]]) -> list[torch.Tensor]:
        """``eps`` for every ``(group, param)`` in ``items`` (all have gradients), before masking."""
        ts: list[torch.Tensor | None] = []
        for _, q in items:
            if self.adaptive is None or not self._scaled(q):
                ts.append(None)
            elif self.adaptive == "elementwise":
                ts.append(q.detach().abs().add_(self.eta))
            else:
                ts.append(torch.linalg.vector_norm(q.detach()) * (1.0 + self.eta))
        masks = [self._mask(q) for _, q in items]
        if self.p == math.inf:
            out = []
            for (group, q), t, m in zip(items, ts, masks):
                e = q.grad.sign().mul_(group["rho"])
                e = e.mul_(t) if t is not None else e
                out.append(e.mul_(m) if m is not None else e)
            return out
        # math in fp32 for low-precision parameters, in the parameter dtype otherwise (fp64 stays fp64), as KOALA does
        us = [_math(q.grad) * t if t is not None else _math(q.grad) for (_, q), t in zip(items, ts)]
        norm_terms = [u * m if (m is not None and self._mask_in_norm()) else u for u, m in zip(us, masks)]
        device = us[0].device
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u).to(device) for u in norm_terms]))
        out = []
        for (group, q), t, u, m in zip(items, ts, us, masks):
            e = u.mul(group["rho"] / (norm + self.xi))
            e = e.mul_(t) if t is not None else e
            e = e.mul_(m) if m is not None else e
            out.append(e.to(q.dtype))
        return out

    def _mask(self, q: torch.Tensor) -> torch.Tensor | None:
        """Binary perturbation mask of ``q`` (SSAM); ``None`` = perturb every entry."""
        return None

    def _mask_in_norm(self) -> bool:
        return False

    def _on_pass1_gradients(self) -> None:
        """Hook with the pass-1 gradients at ``w`` (SSAM-D mask updates); in a SAM step it runs after the ascent, so
        the weights are at ``w + eps`` (the official SSAM-D scores ``|w + eps|``), in a plain step at ``w``."""

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Ascent: save ``w`` of the perturbed set and move it to ``w + eps`` (uses the current gradients)."""
        items = [(g, q) for g in self.param_groups for q in g["params"] if q.grad is not None and self.is_perturbed(q)]
        eps = self._perturbation(items) if items else []
        for (_, q), e in zip(items, eps):
            old = self._old.get(q)
            if old is None or old.shape != q.shape:
                self._old[q] = q.detach().clone()
            else:
                old.copy_(q.detach())
            q.add_(e)
        self._perturbed = [q for _, q in items]
        self._on_pass1_gradients()  # after the ascent: weights at w + eps, gradients still those at w (official order)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Descent: copy ``w`` back into the perturbed set and step the base optimizer with the current gradients."""
        for q in self._perturbed:
            q.copy_(self._old[q])
        self._perturbed = []
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @contextlib.contextmanager
    def _pass1_freeze(self):
        frozen = []
        if self.freeze_non_norm_pass1:
            if is_distributed():
                raise RuntimeError("freeze_non_norm_pass1=True cannot run under DDP (the reducer waits for the "
                                   "gradients of every parameter); set it to False for multi-device training")
            frozen = [q for q in self._roles if q.requires_grad and not self.is_perturbed(q)]
            for q in frozen:
                q.requires_grad_(False)
        try:
            yield
        finally:
            for q in frozen:
                q.requires_grad_(True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step; ``closure`` (required) runs forward + backward and returns the loss. Returns the pass-1
        loss. Every call after the first must not update BatchNorm running statistics (see ``sam_closure``)."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure that runs forward + backward and returns the loss: it "
                "evaluates it twice (at w and at w + eps). Use opt.step(closure), e.g. with "
                "lightning_methods.optim.sam_closure"
            )
        use_sam = self.sam_this_step()
        self.steps += 1
        self.last_step_was_sam = use_sam
        self.last_perturbed_loss = None  # what the closure returned at w + eps (official SAM-ON logs it)
        self.pass1_local = use_sam and self.m_sharpness
        try:
            with torch.enable_grad(), (self._pass1_freeze() if use_sam else contextlib.nullcontext()):
                loss = closure()
        finally:
            self.pass1_local = False
        if not use_sam:
            self._on_pass1_gradients()
            self.base_optimizer.step()
            return loss
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            self.last_perturbed_loss = self._second_pass(closure)
        self.second_step()
        return loss

    def _second_pass(self, closure: Callable[[], Any]) -> Any:
        """The closure at ``w + eps``. On the first two-pass step only, watch it for BatchNorm layers that update
        their running statistics (training mode, no ``frozen_bn_stats``) and warn once: the statistics would then
        move twice per step, once from the perturbed weights."""
        if not self._bn_check_pending:
            return closure()
        self._bn_check_pending = False
        updating: list[str] = []

        def watch(module: nn.Module, args: Any) -> None:
            if isinstance(module, _BatchNorm) and module.training and module.track_running_stats and not updating:
                updating.append(type(module).__name__)

        handle = register_module_forward_pre_hook(watch)
        try:
            out = closure()
        finally:
            handle.remove()
        if updating:
            warnings.warn(
                f"{type(self).__name__}: the second (perturbed) pass ran with {updating[0]} layers in training mode, "
                "so their running statistics were updated twice this step, once from the perturbed weights. "
                "ImageClassifier freezes them in that pass; in your own loop build the closure with "
                "lightning_methods.optim.sam_closure (or wrap calls after the first in "
                "lightning_methods.frozen_bn_stats). Ignore this if it is deliberate.", stacklevel=3)
        return out

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["sam"] = {"steps": self.steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        if "base_optimizer" not in state_dict:
            raise KeyError(f"not a {type(self).__name__} state dict (no 'base_optimizer' entry): it was saved by a "
                           "different optimizer")
        base = state_dict.pop("base_optimizer")
        self.steps = int(state_dict.pop("sam", {}).get("steps", 0))
        self.base_optimizer.load_state_dict(base)
        super().load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # re-link after both loads replaced their groups

    def __repr__(self) -> str:
        opts = f"rho={self.param_groups[0]['rho']}, perturb={self.perturb!r}, adaptive={self.adaptive!r}, p={self.p}"
        return f"{type(self).__name__}({opts}, base={self.base_optimizer!r})"

