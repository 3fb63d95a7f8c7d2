"""KOALA++: Kalman optimization with gradient-covariance products.

Xia, Davtyan, Favaro. *KOALA++: Efficient Kalman-Based Optimization of Neural Networks with Gradient-Covariance
Products*. NeurIPS 2025, arXiv 2506.04432 (Algorithm 1; official code ``Task1_Image_Classification/koalap.py`` of
Sumxiaa/KOALA_Plus_Plus).

Per parameter tensor (flattened to a vector) KOALA++ propagates the gradient-covariance product
``v_k = H_k P_{k-1}`` instead of the covariance itself; the older covariance is closed by a minimum-Frobenius-norm
estimate, which gives an implicitly anisotropic step at first-order cost (two n-vectors of state per tensor, like
Adam). With ``u = v_k + Q H_k`` and ``S_k = H_k.u + R`` the step is ``p -= lr * L_p * u / S_k``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_methods.optim.koala_base import KOALABase, _add_scaled, _math_dtype


class KOALAPlusPlus(KOALABase):
    """KOALA++ (Algorithm 1 of arXiv 2506.04432). Use it like any optimizer with a closure, or through
    ``ImageClassifier(optimizer=...)``; see :class:`~lightning_methods.optim.koala_base.KOALABase` for the step.

    Args:
        params: parameters or parameter groups (``lr``, ``weight_decay``, ``sigma``, ``q``, ``symmetric`` may differ
            per group).
        lr: fraction of the current loss to remove per step (1.0 in the paper's CNN runs); scheduled as usual.
        sigma: initial covariance ``P_0 = sigma * I`` (first visit: ``v = sigma * H``).
        q: process noise ``Q = q * I``.
        r: fixed measurement noise; ``None`` (default) estimates R online from the mean squared per-sample loss.
        alpha_r: smoothing of the online R (``R_0 = 1``).
        weight_decay: folded into the measurement: ``H = grad + wd * p``, tensor loss ``L + wd/2 ||p||^2``.
        symmetric: add the symmetric correction ``w_k H_{k-1}`` (default, Algorithm 1); ``False`` is the
            asymmetric solution ``H_k P_{k-2} = alpha_k v_{k-1}`` (``w_k = 0``).
        loss_offset: constant added to every per-sample loss (for losses that can be negative).
        grad_eps: tensors with gradient norm below this are skipped and keep their state.
        s_min: floor of S together with R (``S <- max(S, R, s_min)``); clamps are counted in ``s_clamp_count``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        sigma: float = 0.1,
        q: float = 0.1,
        r: float | None = None,
        alpha_r: float = 0.9,
        weight_decay: float = 5e-4,
        symmetric: bool = True,
        loss_offset: float = 0.0,
        grad_eps: float = 1e-9,
        s_min: float = 1e-12,
    ) -> None:
        if sigma <= 0 or q < 0:
            raise ValueError(f"KOALAPlusPlus: sigma must be > 0 and q >= 0, got sigma={sigma!r}, q={q!r}")
        defaults = dict(lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, weight_decay=weight_decay, symmetric=symmetric,
                        loss_offset=loss_offset, grad_eps=grad_eps, s_min=s_min)
        super().__init__(params, defaults)

    @torch.no_grad()
    def _update(self, loss: torch.Tensor, r: torch.Tensor) -> None:
        clamps: list[torch.Tensor] = []
        for group in self.param_groups:
            lr, wd, q = group["lr"], group["weight_decay"], group["q"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("KOALAPlusPlus does not support sparse gradients")
                dtype = _math_dtype(p)
                g = p.grad.detach().reshape(-1).to(dtype)
                x = p.detach().reshape(-1).to(dtype) if wd else None
                active = self._active(g)
                h = torch.add(g, x, alpha=wd) if wd else g
                state = self.state[p]
                if not state:
                    # First visit (Algorithm 1): v_0 = sigma * H, H_prev = H, S_prev = H.v_0 + Q ||H||^2 + R. The state
                    # is created at the first step with a usable gradient, as in the official code (one host sync per
                    # tensor, only until its state exists).
                    if not bool(active):
                        continue
                    hh = torch.dot(h, h)
                    state["v"] = h * group["sigma"]
                    state["H"] = h.clone()
                    state["S"] = hh * (group["sigma"] + q) + r
                v_prev, h_prev, s_prev = state["v"], state["H"], state["S"]
                xx = torch.dot(h_prev, h_prev)
                y = torch.dot(h_prev, v_prev)
                hv = torch.dot(h, v_prev)
                hh_prev = torch.dot(h, h_prev)
                lam = (hv + q * hh_prev) / s_prev
                alpha = hh_prev / xx
                w = hv / xx - hh_prev * y / (xx * xx) if group["symmetric"] else torch.zeros_like(alpha)
                # v = (alpha - lam) v_prev + Q (H - lam H_prev) + w H_prev
                v = v_prev * (alpha - lam)
                v.add_(h, alpha=q)
                v.addcmul_(h_prev, w - q * lam)
                u = torch.add(v, h, alpha=q)
                s = self._clamp_s(torch.dot(h, u) + r, r, active, clamps)
                layer_loss = loss + 0.5 * wd * torch.dot(x, x) if wd else loss
                coef = torch.where(active, -lr * layer_loss / s, torch.zeros_like(s))
                _add_scaled(p, u, coef.to(dtype))
                state["v"] = torch.where(active, v, v_prev)
                state["H"] = torch.where(active, h, h_prev)
                state["S"] = torch.where(active, s, s_prev)
        self._count_clamps(clamps)
