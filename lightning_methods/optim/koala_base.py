"""Shared machinery of the KOALA family (KOALA-V, KOALA-M, KOALA++): the closure step, the loss moments, the
measurement noise R, the clamp on the innovation covariance S and checkpointable state.

Papers: Davtyan et al., *KOALA: A Kalman Optimization Algorithm with Loss Adaptivity*, AAAI 2022, arXiv 2107.03331;
Xia, Davtyan, Favaro, *KOALA++: Efficient Kalman-Based Optimization of Neural Networks with Gradient-Covariance
Products*, NeurIPS 2025, arXiv 2506.04432.

A KOALA step treats the mean minibatch loss ``L`` as a noisy scalar measurement of the target loss ``(1 - lr) * L``
and moves every parameter tensor along its Kalman gain. ``step(closure)`` runs ``predict()`` (before the forward
pass), the closure (forward + backward; it returns the per-sample loss vector, or a scalar loss), reduces ``L =
mean(l_i)`` and ``L2 = mean(l_i^2)`` over all data-parallel ranks, and runs ``update(L, L2)``. The step issues no
host synchronisation after the first step (skipped tensors are masked on the device). Numerics: vector math in fp32
(fp64 for fp64 parameters); the loss, R, S and the KOALA-V/M covariances are float64 scalars.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_methods.utils.distributed import all_reduce_flat, is_distributed

#: Key of the optimizer-wide state (R, S-clamp counter, KOALA-V/M covariance) in ``optimizer.state``.
GLOBAL_KEY = "koala"
#: Hyperparameters that are shared by all parameter groups (read from the first group).
GLOBAL_HPARAMS = ("r", "alpha_r", "loss_offset", "grad_eps", "s_min")
#: How often (in steps) the sign of the loss is checked on an accelerator (one host sync each time).
LOSS_CHECK_INTERVAL = 100
#: Initial value of the adaptive measurement noise R (official code).
R_INIT = 1.0


def _all_reduce_sum(stats: torch.Tensor) -> torch.Tensor:
    return all_reduce_flat([stats])[0]


def default_all_reduce() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A summing all-reduce when ``torch.distributed`` is initialized with more than one rank, else ``None``."""
    return _all_reduce_sum if is_distributed() else None


def global_loss_moments(
    losses: torch.Tensor,
    offset: float = 0.0,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None | bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean square of the (offset) losses over all samples of all ranks.

    Args:
        losses: per-sample losses of this rank (any shape; a 0-d tensor counts as one sample).
        offset: constant added to every loss before the moments (for losses that can be zero or negative).
        all_reduce: a function summing a tensor over the ranks (in place or not, returning the sum); ``True`` uses
            ``torch.distributed`` when it is initialized with several ranks; ``None``/``False`` keeps it local.

    Returns:
        ``(L, L2)``: float64 0-d tensors. Each rank contributes ``sum l``, ``sum l^2`` and its sample count, so the
        result is the exact global mean even when ranks hold different numbers of samples.
    """
    x = losses.detach().reshape(-1).double()
    if offset:
        x = x + offset
    stats = torch.stack([x.sum(), x.square().sum(), x.new_full((), x.numel())])
    if all_reduce is True:
        all_reduce = default_all_reduce()
    if all_reduce:
        stats = all_reduce(stats)
    return stats[0] / stats[2], stats[1] / stats[2]


def _math_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 parameters."""
    return torch.promote_types(p.dtype, torch.float32)


class KOALABase(Optimizer):
    """Base of the KOALA optimizers (not used directly). Subclasses implement ``predict`` and ``_update``.

    Shared hyperparameters (keyword arguments of every subclass, stored in the parameter groups):
        lr: fraction of the current loss to remove per step (target loss ``(1 - lr) * L``); scheduled as usual.
        weight_decay: folded into the measurement as the papers do: ``h = grad + wd * p`` and the loss of a tensor is
            ``L + wd/2 * ||p||^2``. Applied to every tensor of the group. Do not add weight decay anywhere else.
        r: fixed measurement noise R; ``None`` estimates it online as ``R <- alpha_r R + (1 - alpha_r) L2``
            (``R_0 = 1``) from the mean squared per-sample loss.
        alpha_r: smoothing of the online R.
        loss_offset: constant added to every per-sample loss before the step (the convergence proof of KOALA allows a
            constant shift of the loss). Needed for losses that can be negative; a negative mean loss raises.
        grad_eps: tensors whose gradient norm is below this are skipped and keep their state (official: 1e-9).
        s_min: lower bound of the innovation covariance S together with R: ``S <- max(S, R, s_min)``. Every clamp
            is counted in ``s_clamp_count`` (our safety guard; S can turn non-positive in KOALA++).
    """

    #: A GradScaler cannot serve a step that reads the loss value and the gradient magnitude (``16-mixed``).
    supports_grad_scaler = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], global_hparams: tuple[str, ...] = ()) -> None:
        _check_hparams(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hparams(group)
            for key in GLOBAL_HPARAMS + tuple(global_hparams):
                if group[key] != self.param_groups[0][key]:
                    raise ValueError(
                        f"{type(self).__name__}: {key!r} is shared by all parameter groups, but groups set "
                        f"{self.param_groups[0][key]!r} and {group[key]!r}; set it once in the constructor."
                    )
        self._reset_loss_check()

    def _reset_loss_check(self) -> None:
        self._unchecked_steps = 0
        self._loss_checked = False
        self._negative_loss_steps: torch.Tensor | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:  # pickling / deepcopy keep only defaults, state, groups
        super().__setstate__(state)
        if not hasattr(self, "_unchecked_steps"):
            self._reset_loss_check()

    # ------------------------------------------------------------------------------------------------ API
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """``predict()``, evaluate ``closure`` (forward + backward, returns the per-sample losses), ``update(L, L2)``.

        Returns the closure's output. The closure must return a tensor: the per-sample loss vector (KOALA's intent:
        ``L2 = mean(l_i^2)`` enters R), or a scalar loss (then ``L2 = L^2``).
        """
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure that runs forward and backward and returns the per-sample "
                "loss vector (KOALA reads the loss value), e.g. opt.step(lambda: compute_losses_and_backward())."
            )
        self.predict()
        with torch.enable_grad():
            losses = closure()
        if not isinstance(losses, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}: the closure must return the loss as a tensor (per-sample vector or scalar), "
                f"got {type(losses).__name__}."
            )
        loss, loss_sq = global_loss_moments(losses, self.param_groups[0]["loss_offset"])
        self._check_loss(loss)
        self.update(loss, loss_sq)
        return losses

    @torch.no_grad()
    def predict(self) -> None:
        """Kalman prediction, run before the forward pass (``step`` calls it)."""
        device = self._device(any_param=True)
        if device is not None:
            with _no_autocast(device):
                self._predict(device)

    def _predict(self, device: torch.device) -> None:
        """Subclasses: the prediction step (KOALA++ has none)."""

    def _update(self, loss: torch.Tensor, r: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, loss: torch.Tensor | float, loss_sq: torch.Tensor | float) -> None:
        """Kalman update from the mean loss ``L`` and the mean squared loss ``L2`` (gradients must be in ``.grad``).

        ``step`` passes rank-reduced moments of the offset losses; when calling ``update`` yourself, add
        ``loss_offset`` and reduce over ranks yourself (see ``global_loss_moments``).
        """
        device = self._device()
        if device is None:
            return
        with _no_autocast(device):
            loss = torch.as_tensor(loss, dtype=torch.float64, device=device)
            loss_sq = torch.as_tensor(loss_sq, dtype=torch.float64, device=device)
            self._update(loss, self._measurement_noise(loss_sq))

    @property
    def s_clamp_count(self) -> torch.Tensor | None:
        """Cumulative number of (tensor, step) pairs whose innovation covariance S was clamped (device tensor)."""
        return self.state[GLOBAL_KEY].get("s_clamps") if GLOBAL_KEY in self.state else None

    def statistics(self) -> dict[str, torch.Tensor]:
        """0-d device tensors worth logging (no host sync): ``R``, ``s_clamps`` and the subclass's covariances."""
        if GLOBAL_KEY not in self.state:
            return {}
        g = self.state[GLOBAL_KEY]
        return {"R": g["R"], "s_clamps": g["s_clamps"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load exactly: unlike ``torch.optim.Optimizer``, per-parameter state keeps its dtype (fp32/fp64 math state of
        bf16 parameters is not cast to bf16) and the optimizer-wide state is copied, not aliased."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                self.state[p] = {k: _copy_to(v, p.device) for k, v in saved.items()}
        if GLOBAL_KEY in state_dict["state"]:
            device = self._device(any_param=True)
            self.state[GLOBAL_KEY] = {k: _copy_to(v, device) for k, v in state_dict["state"][GLOBAL_KEY].items()}

    # ------------------------------------------------------------------------------------------------ helpers
    def _device(self, any_param: bool = False) -> torch.device | None:
        for group in self.param_groups:
            for p in group["params"]:
                if any_param or p.grad is not None:
                    return p.device
        return None

    def _global_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Optimizer-wide state, created on first use and kept on the parameters' device."""
        g = self.state[GLOBAL_KEY]
        if not g:
            g["R"] = torch.full((), R_INIT, dtype=torch.float64, device=device)
            g["s_clamps"] = torch.zeros((), dtype=torch.int64, device=device)
            self._init_global_state(g, device)
        elif g["R"].device != device:
            for k, v in g.items():
                g[k] = v.to(device)
        return g

    def _init_global_state(self, g: dict[str, torch.Tensor], device: torch.device) -> None:
        """Subclasses add their optimizer-wide tensors (e.g. the covariance P)."""

    def _measurement_noise(self, loss_sq: torch.Tensor) -> torch.Tensor:
        """Update and return R (once per step, shared by all tensors)."""
        group = self.param_groups[0]
        g = self._global_state(loss_sq.device)
        if group["r"] is None:
            g["R"].mul_(group["alpha_r"]).add_(loss_sq * (1.0 - group["alpha_r"]))
        else:
            g["R"].fill_(group["r"])
        return g["R"]

    def _clamp_s(self, s: torch.Tensor, r: torch.Tensor, active: torch.Tensor,
                 clamps: list[torch.Tensor]) -> torch.Tensor:
        """``max(S, R, s_min)``; appends whether the clamp fired on an active tensor (0-d bool) to ``clamps``."""
        floor = r.clamp(min=self.param_groups[0]["s_min"])
        clamps.append((s < floor) & active)
        return torch.maximum(s, floor)

    def _count_clamps(self, clamps: list[torch.Tensor]) -> None:
        if clamps:
            self.state[GLOBAL_KEY]["s_clamps"].add_(torch.stack(clamps).sum())

    def _active(self, grad: torch.Tensor) -> torch.Tensor:
        """0-d bool tensor: the gradient norm reaches ``grad_eps`` (else the tensor is skipped)."""
        eps = self.param_groups[0]["grad_eps"]
        return torch.dot(grad, grad) >= eps * eps

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Raise on a negative mean loss; on accelerators check every ``LOSS_CHECK_INTERVAL`` steps (no sync else)."""
        neg = (loss < 0).to(torch.int64)
        self._negative_loss_steps = neg if self._negative_loss_steps is None else self._negative_loss_steps + neg
        self._unchecked_steps += 1
        if loss.device.type == "cpu" or not self._loss_checked or self._unchecked_steps >= LOSS_CHECK_INTERVAL:
            count = int(self._negative_loss_steps)
            self._loss_checked, self._unchecked_steps, self._negative_loss_steps = True, 0, None
            if count:
                raise ValueError(
                    f"{type(self).__name__}: the mean loss was negative in {count} step(s). KOALA scales its step by "
                    "the loss and needs L >= 0 (target (1 - lr) * L). Shift the loss by a constant with "
                    "loss_offset=c (c >= -min loss; the convergence analysis allows a constant offset)."
                )


def _check_hparams(h: dict[str, Any]) -> None:
    def bad(name: str, rule: str) -> ValueError:
        return ValueError(f"KOALA: {name} must be {rule}, got {h[name]!r}")

    if not float(h["lr"]) >= 0:
        raise bad("lr", "a float >= 0 (the fraction of the loss to remove per step, 1.0 in the papers)")
    if h["weight_decay"] < 0:
        raise bad("weight_decay", ">= 0")
    if h["r"] is not None and h["r"] < 0:
        raise bad("r", "None (adaptive) or >= 0")
    if not 0.0 <= h["alpha_r"] < 1.0:
        raise bad("alpha_r", "in [0, 1)")
    if not math.isfinite(h["loss_offset"]):
        raise bad("loss_offset", "finite")
    if h["grad_eps"] < 0 or h["s_min"] <= 0:
        raise ValueError(f"KOALA: grad_eps must be >= 0 and s_min > 0, got {h['grad_eps']!r}, {h['s_min']!r}")


def _add_scaled(p: torch.Tensor, direction: torch.Tensor, coef: torch.Tensor) -> None:
    """``p += coef * direction`` for a flat ``direction`` in the math dtype and a 0-d ``coef``."""
    if p.dtype == direction.dtype:
        p.addcmul_(direction.view(p.shape), coef)
    else:
        p.add_((direction * coef).view(p.shape).to(p.dtype))


def _copy_to(value: Any, device: torch.device | None) -> Any:
    return value.to(device=device, copy=True) if isinstance(value, torch.Tensor) else value


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The optimizer math runs in fp32 even when ``step`` is called inside an autocast region (bf16-mixed)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # pragma: no cover - device types without autocast support
        return contextlib.nullcontext()
