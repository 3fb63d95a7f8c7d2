"""Exact log-likelihood of a score model by the probability-flow ODE (Song et al., arXiv 2011.13456, Sec. D.2), as
the RDM scores representations ("Revisiting Likelihood-Based OOD Detection by Modeling Representations",
arXiv 2504.07793; official code limchaos/Likelihood-OOD ``project/likelihood.py``).

``dz/dt = f(z, t) - g(t)^2 s(z, t) / 2`` is integrated from ``eps`` to ``T`` together with the divergence of its
right-hand side, and ``log p_0(z) = log p_T(z_T) + int_eps^T div f dt``. The divergence is exact (the trace of the
Jacobian from ``d`` basis probes, for small ``d``) or a Hutchinson estimate with fixed Rademacher/Gaussian probes.

The whole batch is one ODE for an adaptive ``torchdiffeq`` solver (``fehlberg2``, rtol = atol = 1e-5 in the RDM code),
so samples are scored in parallel. By default the ODE state (and so the accumulated log-density change) is float64
while the score network runs in its own dtype; ``state_dtype=torch.float32`` reproduces the official float32 path.
Probes are drawn per sample from ``(seed, index)``, so a sample's estimate does not depend on its batch or its rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_methods.ood.sde import SDE
from lightning_methods.utils import mix_seed

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, d), t (B,)) -> score (B, d)
Trace = Literal["auto", "exact", "hutchinson"]


@dataclass
class Likelihood:
    """Per-sample results (float64): ``logp = prior_logp + delta_logp``; ``nfe`` counts right-hand-side calls, ``dim``
    is the data dimension."""

    logp: torch.Tensor
    prior_logp: torch.Tensor
    delta_logp: torch.Tensor
    nfe: int
    dim: int = 1

    @property
    def nll_per_dim(self) -> torch.Tensor:
        """The RDM code's reported score, ``-(prior_logp + delta_logp) / d``."""
        return -self.logp / self.dim


def hutchinson_probes(index: torch.Tensor, dim: int, n_probes: int = 1, seed: int = 0,
                      kind: Literal["rademacher", "gaussian"] = "rademacher") -> torch.Tensor:
    """Probe vectors ``(n_probes, B, dim)`` on the CPU, each sample's drawn from ``(seed, index)`` only.

    Raises:
        ValueError: unknown kind or ``n_probes < 1``.
    """
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"unknown probe kind {kind!r}; choose 'rademacher' or 'gaussian'")
    out = torch.empty(len(index), n_probes, dim)
    for row, i in enumerate(index.tolist()):
        gen = torch.Generator().manual_seed(mix_seed(seed, int(i)))
        if kind == "rademacher":
            out[row] = torch.randint(0, 2, (n_probes, dim), generator=gen).float() * 2 - 1
        else:
            out[row] = torch.randn(n_probes, dim, generator=gen)
    return out.transpose(0, 1).contiguous()


def pf_ode_likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: torch.Tensor,
    *,
    trace: Trace = "auto",
    exact_max_dim: int = 16,
    probes: torch.Tensor | None = None,
    n_probes: int = 1,
    probe_kind: Literal["rademacher", "gaussian"] = "rademacher",
    index: torch.Tensor | None = None,
    seed: int = 0,
    eps: float = 1e-5,
    method: str = "fehlberg2",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    state_dtype: torch.dtype = torch.float64,
    per_sample_error: bool = False,
    step_size: float | None = None,
) -> Likelihood:
    """Log-likelihood ``log p_0(x)`` of every row of ``x`` (B, d) under the score model.

    Args:
        score_fn: ``(x, t) -> score`` with ``x`` in the network's dtype and ``t`` of shape (B,).
        sde: the forward SDE the score model was trained with.
        x: the samples (B, d).
        trace: ``"exact"`` (d basis probes), ``"hutchinson"`` or ``"auto"`` (exact when ``d <= exact_max_dim``).
        exact_max_dim: the largest dimension ``"auto"`` computes exactly.
        probes: explicit Hutchinson probes (K, B, d) (e.g. to reproduce another implementation); overrides the
            seeded draw.
        n_probes: Hutchinson probes per sample (their estimates are averaged); 1 in the RDM code.
        probe_kind: ``"rademacher"`` (RDM code) or ``"gaussian"``.
        index: per-sample ids for the seeded probes (default ``0..B-1``); pass the dataset index so that results do
            not depend on batching.
        seed: seed of the probes.
        eps: start time of the integration (1e-5 in the RDM code).
        method: ``torchdiffeq`` solver (``"fehlberg2"``, ``"dopri5"``, ...).
        rtol: relative tolerance of the adaptive solver.
        atol: absolute tolerance of the adaptive solver.
        state_dtype: dtype of the ODE state (float64: the log-density change accumulates in float64).
        per_sample_error: control the step size by the worst sample's error instead of the RMS over the batch (the
            torchdiffeq default), so a sample's accuracy does not depend on the other samples of its batch.
        step_size: step of a fixed-grid solver (``method="rk4"``, ``"midpoint"``, ``"euler"``); its results do not
            depend on the batch at all (adaptive solvers share their steps across the batch).

    Raises:
        ImportError: torchdiffeq is missing (``pip install 'lightning-methods[ood]'``).
        ValueError: bad shapes or options.
    """
    try:
        from torchdiffeq import odeint
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("PF-ODE likelihoods need torchdiffeq: pip install 'lightning-methods[ood]'") from err
    if x.ndim != 2:
        raise ValueError(f"pf_ode_likelihood expects samples of shape (B, d), got {tuple(x.shape)}")
    b, d = x.shape
    if trace not in ("auto", "exact", "hutchinson"):
        raise ValueError(f"unknown trace {trace!r}; choose 'auto', 'exact' or 'hutchinson'")
    exact = trace == "exact" or (trace == "auto" and d <= exact_max_dim and probes is None)
    net_dtype = x.dtype if x.is_floating_point() else torch.float32
    if exact:
        basis = torch.eye(d, dtype=net_dtype, device=x.device)
        vectors, scale = basis[:, None, :].expand(d, b, d), 1.0
    else:
        if probes is None:
            idx = torch.arange(b) if index is None else index.detach().cpu()
            probes = hutchinson_probes(idx, d, n_probes, seed, probe_kind)
        if probes.shape[1:] != (b, d):
            raise ValueError(f"probes must have shape (K, {b}, {d}), got {tuple(probes.shape)}")
        vectors, scale = probes.to(device=x.device, dtype=net_dtype), 1.0 / probes.shape[0]
    k = vectors.shape[0]
    flat_vectors = vectors.reshape(k * b, d)
    nfe = 0

    def rhs(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        z = state[: b * d].reshape(b, d).to(net_dtype)
        with torch.enable_grad():
            zk = z.repeat(k, 1).requires_grad_(True)
            tk = torch.full((k * b,), float(t), dtype=net_dtype, device=x.device)
            drift = sde.pf_drift(zk, tk, score_fn(zk, tk))
            grad = torch.autograd.grad((drift * flat_vectors).sum(), zk)[0]
        div = (grad * flat_vectors).sum(dim=1).reshape(k, b).sum(dim=0) * scale
        return torch.cat([drift[:b].detach().reshape(-1), div.detach()]).to(state.dtype)

    options: dict = {} if step_size is None else {"step_size": step_size}
    if per_sample_error:
        def norm(tensor: torch.Tensor) -> torch.Tensor:
            parts = torch.cat([tensor[: b * d].reshape(b, d), tensor[b * d :].reshape(b, 1)], dim=1)
            return parts.pow(2).mean(dim=1).sqrt().max()

        options["norm"] = norm
    state0 = torch.cat([x.detach().reshape(-1).to(state_dtype), torch.zeros(b, dtype=state_dtype, device=x.device)])
    times = torch.tensor([eps, sde.T], dtype=state_dtype, device=x.device)
    with torch.no_grad():
        end = odeint(rhs, state0, times, rtol=rtol, atol=atol, method=method, options=options or None)[-1]
    z_end = end[: b * d].reshape(b, d).to(torch.float64)
    delta = end[b * d :].to(torch.float64)
    prior = sde.prior_logp(z_end)
    return Likelihood(prior + delta, prior, delta, nfe, dim=d)
