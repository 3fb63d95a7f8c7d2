"""KOALA-V and KOALA-M: Kalman optimization with loss adaptivity; KOALA++ lives in ``koala_plus_plus.py``.

Davtyan, Sameni, Cerkezi, Meishvili, Bielski, Favaro. *KOALA: A Kalman Optimization Algorithm with Loss Adaptivity*.
AAAI 2022, arXiv 2107.03331 (supplementary Algorithm 2; official code Araachie/koala).

Both keep the covariance as a scalar per tensor block, shared by all tensors (updated with the largest
``||h||^2 / S`` over tensors). The gain turns the loss gap ``lr * L`` into a Polyak-like step along the gradient:
``eta = P_hat (L - L_target) / (P_hat ||g||^2 + R)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

from lightning_methods.optim.koala_base import KOALABase, _add_scaled, _math_dtype
from lightning_methods.optim.koala_plus_plus import KOALAPlusPlus

#: EMA decay of KOALA-M's weight average and of its state-noise estimate q_x (official code).
AVG_DECAY = 0.9


class KOALAV(KOALABase):
    """KOALA-V (vanilla): scalar covariance ``P I``, fixed process noise ``Q = q I``.

    ``predict``: ``P_hat = P + q``. ``update``: for every tensor ``h = g + wd p``, ``S = P_hat ||h||^2 + R``,
    ``p -= lr (L + wd/2 ||p||^2) P_hat / S * d`` and then ``P = P_hat - P_hat^2 max_p ||h||^2 / S``. With ``R = 0`` the
    step is the Polyak step ``lr L g / ||g||^2`` with target ``(1 - lr) L``.

    Args:
        params: parameters or groups (``lr`` and ``weight_decay`` may differ per group; the rest is shared).
        lr: fraction of the current loss to remove per step (1.0 in the paper).
        sigma: initial covariance ``P_0``.
        q: process noise. Not given by the paper; default 0.01 (our choice, as KOALA-M's ``q_v``). The official
            ``VanillaKOALA`` defaults to ``q = 1`` and its scripts never change it.
        r, alpha_r, weight_decay, loss_offset, grad_eps, s_min: see :class:`KOALABase`.
        direction: ``"grad"`` (official code) steps along the loss gradient ``g``, weight decay entering only S and
            the loss; ``"h"`` steps along ``h = g + wd p``, the Jacobian of the measurement (as KOALA-M does).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        sigma: float = 0.1,
        q: float = 0.01,
        r: float | None = None,
        alpha_r: float = 0.9,
        weight_decay: float = 5e-4,
        direction: Literal["grad", "h"] = "grad",
        loss_offset: float = 0.0,
        grad_eps: float = 1e-9,
        s_min: float = 1e-12,
    ) -> None:
        if sigma <= 0 or q < 0:
            raise ValueError(f"KOALAV: sigma must be > 0 and q >= 0, got sigma={sigma!r}, q={q!r}")
        if direction not in ("grad", "h"):
            raise ValueError(f"KOALAV: direction must be 'grad' or 'h', got {direction!r}")
        defaults = dict(lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, weight_decay=weight_decay, direction=direction,
                        loss_offset=loss_offset, grad_eps=grad_eps, s_min=s_min)
        super().__init__(params, defaults, global_hparams=("sigma", "q", "direction"))

    def _init_global_state(self, g: dict[str, torch.Tensor], device: torch.device) -> None:
        g["P"] = torch.full((), self.param_groups[0]["sigma"], dtype=torch.float64, device=device)

    def _predict(self, device: torch.device) -> None:
        self._global_state(device)["P"].add_(self.param_groups[0]["q"])

    def statistics(self) -> dict[str, torch.Tensor]:
        stats = super().statistics()
        if stats:
            stats["P"] = self.state["koala"]["P"]
        return stats

    @torch.no_grad()
    def _update(self, loss: torch.Tensor, r: torch.Tensor) -> None:
        glob = self.state["koala"]
        p_hat = glob["P"]
        ratios: list[torch.Tensor] = []
        clamps: list[torch.Tensor] = []
        along_h = self.param_groups[0]["direction"] == "h"
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                dtype = _math_dtype(p)
                g = p.grad.detach().reshape(-1).to(dtype)
                x = p.detach().reshape(-1).to(dtype) if wd else None
                active = self._active(g)
                h = torch.add(g, x, alpha=wd) if wd else g
                hh = torch.dot(h, h)
                s = self._clamp_s(p_hat * hh + r, r, active, clamps)
                layer_loss = loss + 0.5 * wd * torch.dot(x, x) if wd else loss
                coef = torch.where(active, -lr * layer_loss * p_hat / s, torch.zeros_like(s))
                _add_scaled(p, h if along_h else g, coef.to(dtype))
                ratios.append(torch.where(active, hh / s, torch.zeros_like(s)))
        if ratios:
            glob["P"] = p_hat - p_hat.square() * torch.stack(ratios).max()
        self._count_clamps(clamps)


class KOALAM(KOALABase):
    """KOALA-M (momentum): state ``(x, velocity)`` with dynamics ``F = [[1, 1], [0, kappa]]`` and a 2x2 block
    covariance (a scalar times identity per block, float64 algebra).

    ``predict`` (before the forward pass, so forward and backward run at the look-ahead point ``x + v``):
    ``q_x <- 0.9 q_x + 0.1 d``, ``x += v``, ``v *= kappa``, ``P = F P F^T + diag(q_x, q_v)``, with ``d`` the distance
    of the weights from their EMA. ``update``: for every tensor ``h = g + wd x``, ``S = P_xx ||h||^2 + R``,
    ``x -= lr L_x P_xx / S h``, ``v -= lr L_x P_vx / S h``; then ``P -= c P e1 e1^T P`` with ``c = max ||h||^2 / S``.

    Args:
        params: parameters or groups (``lr`` and ``weight_decay`` may differ per group; the rest is shared).
        lr: fraction of the current loss to remove per step (1.0 in the paper).
        sigma_x, sigma_c, sigma_v: initial covariance ``[[sigma_x, sigma_c], [sigma_c, sigma_v]]`` (official ``sw``,
            ``sc``, ``sv``: 0.1, 0, 0.1).
        kappa: velocity decay (official ``a`` = 0.9).
        q_x: initial value of the online state-noise estimate of the weights (official ``qw`` = 0.01).
        q_v: fixed state noise of the velocities (official ``qv`` = 0.01).
        q_x_estimate: distance ``d`` fed to the q_x EMA: ``"paper"`` = ``||x - x_avg||^2 / n`` (supplementary eq. 51),
            ``"official"`` = ``||x - x_avg|| / n`` (official code); ``n`` is the total number of parameters.
        r, alpha_r, weight_decay, loss_offset, grad_eps, s_min: see :class:`KOALABase`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        sigma_x: float = 0.1,
        sigma_c: float = 0.0,
        sigma_v: float = 0.1,
        kappa: float = 0.9,
        q_x: float = 0.01,
        q_v: float = 0.01,
        r: float | None = None,
        alpha_r: float = 0.9,
        weight_decay: float = 5e-4,
        q_x_estimate: Literal["paper", "official"] = "paper",
        loss_offset: float = 0.0,
        grad_eps: float = 1e-9,
        s_min: float = 1e-12,
    ) -> None:
        if sigma_x <= 0 or sigma_v < 0 or sigma_c * sigma_c > sigma_x * sigma_v:
            raise ValueError("KOALAM: the initial covariance [[sigma_x, sigma_c], [sigma_c, sigma_v]] must be positive "
                             f"semi-definite with sigma_x > 0, got {sigma_x!r}, {sigma_c!r}, {sigma_v!r}")
        if q_x < 0 or q_v < 0 or not 0 <= kappa <= 1:
            raise ValueError(f"KOALAM: need q_x, q_v >= 0 and kappa in [0, 1], got {q_x!r}, {q_v!r}, {kappa!r}")
        if q_x_estimate not in ("paper", "official"):
            raise ValueError(f"KOALAM: q_x_estimate must be 'paper' or 'official', got {q_x_estimate!r}")
        defaults = dict(lr=lr, sigma_x=sigma_x, sigma_c=sigma_c, sigma_v=sigma_v, kappa=kappa, q_x=q_x, q_v=q_v, r=r,
                        alpha_r=alpha_r, weight_decay=weight_decay, q_x_estimate=q_x_estimate,
                        loss_offset=loss_offset, grad_eps=grad_eps, s_min=s_min)
        shared = ("sigma_x", "sigma_c", "sigma_v", "kappa", "q_x", "q_v", "q_x_estimate")
        super().__init__(params, defaults, global_hparams=shared)

    def _init_global_state(self, g: dict[str, torch.Tensor], device: torch.device) -> None:
        h = self.param_groups[0]
        g["P"] = torch.tensor([[h["sigma_x"], h["sigma_c"]], [h["sigma_c"], h["sigma_v"]]], dtype=torch.float64,
                              device=device)
        g["q_x"] = torch.full((), h["q_x"], dtype=torch.float64, device=device)

    def _param_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["velocity"] = torch.zeros_like(p, dtype=_math_dtype(p))
            state["x_avg"] = torch.zeros_like(p, dtype=_math_dtype(p))  # zero start, as the official code
        return state

    def statistics(self) -> dict[str, torch.Tensor]:
        stats = super().statistics()
        if stats:
            glob = self.state["koala"]
            stats.update(P_xx=glob["P"][0, 0], P_xv=glob["P"][0, 1], P_vv=glob["P"][1, 1], q_x=glob["q_x"])
        return stats

    def _predict(self, device: torch.device) -> None:
        h = self.param_groups[0]
        glob = self._global_state(device)
        sq_dists, n = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self._param_state(p)
                sq_dists.append((state["x_avg"] - p).square().sum().to(torch.float64))
                n += p.numel()
                p.add_(state["velocity"])
                state["velocity"].mul_(h["kappa"])
        if not n:
            return
        sq_dist = torch.stack(sq_dists).sum()
        dist_est = sq_dist / n if h["q_x_estimate"] == "paper" else sq_dist.sqrt() / n
        glob["q_x"].mul_(AVG_DECAY).add_(dist_est * (1 - AVG_DECAY))
        kappa, P = h["kappa"], glob["P"]
        a, b, c = P[0, 0], P[0, 1], P[1, 1]
        cross = kappa * (b + c)
        glob["P"] = torch.stack([a + 2 * b + c + glob["q_x"], cross, cross, kappa * kappa * c + h["q_v"]]).view(2, 2)

    @torch.no_grad()
    def _update(self, loss: torch.Tensor, r: torch.Tensor) -> None:
        glob = self.state["koala"]
        P = glob["P"]
        p_xx, p_vx = P[0, 0], P[1, 0]
        ratios: list[torch.Tensor] = []
        clamps: list[torch.Tensor] = []
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._param_state(p)
                dtype = _math_dtype(p)
                g = p.grad.detach().reshape(-1).to(dtype)
                x = p.detach().reshape(-1).to(dtype)
                active = self._active(g)
                h = torch.add(g, x, alpha=wd) if wd else g
                hh = torch.dot(h, h).to(torch.float64)
                s = self._clamp_s(p_xx * hh + r, r, active, clamps)
                layer_loss = loss + 0.5 * wd * torch.dot(x, x) if wd else loss
                gain = torch.where(active, lr * layer_loss / s, torch.zeros_like(s))
                _add_scaled(p, h, (-gain * p_xx).to(dtype))
                state["velocity"].addcmul_(h.view(p.shape), (-gain * p_vx).to(dtype))
                weight = active.to(dtype) * (1 - AVG_DECAY)
                state["x_avg"].lerp_(p.detach().to(dtype), weight)
                ratios.append(torch.where(active, hh / s, torch.zeros_like(s)))
        if ratios:
            col = P[:, 0]
            glob["P"] = P - torch.stack(ratios).max() * torch.outer(col, col)
        self._count_clamps(clamps)


__all__ = ["KOALAM", "KOALAPlusPlus", "KOALAV"]
