"""Named SAM variants: :class:`SAM` with the defaults of one paper each (every argument of :class:`SAM` still works).

- ASAM: Kwon et al., ICML 2021, arXiv 2102.11600 (official code SamsungLabs/ASAM).
- SAM-ON / ASAM-ON: Mueller et al., *Normalization Layers Are All That Sharpness-Aware Minimization Needs*,
  NeurIPS 2023, arXiv 2306.04226 (official code mueller-mp/SAM-ON): perturb only the affine parameters of the
  normalization layers; the norm of the perturbation runs over those parameters only, so they receive the full radius
  and the best ``rho`` is 2-10x larger than for the same variant on all parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch.optim import Optimizer

from lightning_methods.optim.sam import SAM, Adaptive, Perturb, _parse_p


class ASAM(SAM):
    """Adaptive SAM: ``T = |w| + eta`` elementwise (default) or ``||w|| (1 + eta)`` layerwise.

    Defaults: ``rho = 1.0`` (ASAM README, CIFAR-100), ``eta = 0.01`` (ASAM class default). See :class:`SAM` for every
    argument.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[[Iterable[Any]], Optimizer],
        rho: float = 1.0,
        adaptive: Adaptive = "elementwise",
        eta: float = 0.01,
        perturb: Perturb = "all",
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, perturb=perturb, **kwargs)


class SAMON(SAM):
    """SAM-ON: SAM that perturbs only the normalization layers' affine parameters (gamma and beta).

    Default ``rho = 1.0`` (best value in the SAM-ON teaser figure, WRN-28-10 on CIFAR-100). See :class:`SAM`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[[Iterable[Any]], Optimizer],
        rho: float = 1.0,
        perturb: Perturb = "only_norm",
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, perturb=perturb, **kwargs)


class ASAMON(SAM):
    """ASAM-ON: ASAM restricted to the normalization layers' affine parameters.

    Default ``rho`` (``None``) depends on the perturbation shape, since rho is not comparable across them: ``10`` with
    elementwise ``T`` and ``p = 2`` (SAM-ON README recommendation, there with ``normalize_bias=True`` and
    AutoAugment), ``0.5`` layerwise, ``0.1`` for ``p = "inf"`` (best values of the SAM-ON teaser figure).
    See :class:`SAM`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[[Iterable[Any]], Optimizer],
        rho: float | None = None,
        adaptive: Adaptive = "elementwise",
        eta: float = 0.01,
        perturb: Perturb = "only_norm",
        **kwargs: Any,
    ) -> None:
        if rho is None:
            rho = asamon_default_rho(adaptive, kwargs.get("p", 2))
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, perturb=perturb, **kwargs)


def asamon_default_rho(adaptive: Adaptive, p: float | str = 2) -> float:
    """ASAM-ON's default ``rho`` for its perturbation shape: ``p = inf`` 0.1, layerwise 0.5, elementwise 10."""
    if _parse_p(p) == math.inf:
        return 0.1
    return 0.5 if adaptive == "layerwise" else 10.0
