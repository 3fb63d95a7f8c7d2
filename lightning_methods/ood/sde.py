"""Forward SDEs of score-based models (Song et al., "Score-Based Generative Modeling through Stochastic Differential
Equations", arXiv 2011.13456) as used by the representation-space diffusion model (RDM; "Revisiting Likelihood-Based
OOD Detection by Modeling Representations", arXiv 2504.07793, official code limchaos/Likelihood-OOD ``sde_lib.py``).

With ``beta(t) = beta_min + t (beta_max - beta_min)`` and
``log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``:

- VP: ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW``; marginal ``N(alpha_t x_0, (1 - alpha_t^2) I)``; prior N(0, I).
- sub-VP: same drift, ``g(t)^2 = beta(t) (1 - alpha_t^4)``; marginal std ``1 - alpha_t^2``; prior N(0, I).
- VE: ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, no drift, ``g = sigma(t) sqrt(2 log(sigma_max/sigma_min))``;
  marginal std ``sigma(t)`` (as in the official code); prior ``N(0, sigma_max^2 I)``.

The score network predicts the noise for VP / sub-VP (``score = -output / std(t)``, time input ``999 t``) and the
score itself for VE (time input ``sigma(t)``), as in the official code.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

SDEName = Literal["vp", "subvp", "ve"]


class SDE:
    """Base class (end time ``T = 1``); use :class:`VPSDE`, :class:`SubVPSDE`, :class:`VESDE` or :func:`make_sde`."""

    name = ""
    T = 1.0

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_t`` with ``E[x_t | x_0] = alpha_t x_0``."""
        raise NotImplementedError

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """Standard deviation of ``x_t | x_0`` as the official code defines it."""
        raise NotImplementedError

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior ``p_T`` at ``z`` (N, d)."""
        d = z.shape[1]
        return -d / 2.0 * math.log(2 * math.pi) - torch.sum(z**2, dim=1) / 2.0

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        """The time value fed to the score network."""
        return t * 999

    def score(self, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score ``grad log p_t`` from the network output (noise prediction for VP / sub-VP)."""
        return -output / self.marginal_std(t)[:, None]

    def pf_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Probability-flow ODE drift ``f(x, t) - g(t)^2 score / 2``."""
        return self.drift(x, t) - self.diffusion(t)[:, None] ** 2 * score * 0.5

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of ``x_t | x_0`` with the given standard normal ``noise``."""
        return self.mean_coeff(t)[:, None] * x0 + self.marginal_std(t)[:, None] * noise


class VPSDE(SDE):
    """Variance-preserving SDE (DDPM's continuous limit).

    Args:
        beta_min: ``beta(0)``; the RDM code uses 0.2.
        beta_max: ``beta(1)``; the RDM code uses 20.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.2, beta_max: float = 20.0) -> None:
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_mean_coeff(t))

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(t)[:, None] * x

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_mean_coeff(t)))


class SubVPSDE(VPSDE):
    """Sub-VP SDE (the RDM code's default); its marginals do not preserve N(0, I)."""

    name = "subvp"

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        discount = 1.0 - torch.exp(-2 * self.beta_min * t - (self.beta_max - self.beta_min) * t**2)
        return torch.sqrt(self.beta(t) * discount)

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.exp(2.0 * self.log_mean_coeff(t))


class VESDE(SDE):
    """Variance-exploding SDE.

    Args:
        sigma_min: ``sigma(0)`` (0.01 in the RDM code).
        sigma_max: ``sigma(1)`` (50 in the RDM code).
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return self.marginal_std(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        d = z.shape[1]
        return -d / 2.0 * math.log(2 * math.pi * self.sigma_max**2) - torch.sum(z**2, dim=1) / (2 * self.sigma_max**2)

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        return self.marginal_std(t)

    def score(self, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return output


def make_sde(name: SDEName = "vp", beta_min: float = 0.2, beta_max: float = 20.0, sigma_min: float = 0.01,
             sigma_max: float = 50.0) -> SDE:
    """Build an SDE by name (``"vp"``, ``"subvp"``, ``"ve"``).

    Raises:
        ValueError: unknown name.
    """
    if name == "vp":
        return VPSDE(beta_min, beta_max)
    if name == "subvp":
        return SubVPSDE(beta_min, beta_max)
    if name == "ve":
        return VESDE(sigma_min, sigma_max)
    raise ValueError(f"unknown SDE {name!r}; choose 'vp', 'subvp' or 've'")
