"""Numerical rank of a layer's representations (Masarczyk et al., *The Tunnel Effect*, NeurIPS 2023,
arXiv 2305.19753; settings of the reimplementation DHLSmith/jons-tunnel-effect).

For features ``F`` (n samples x d features), centred over the samples, the rank counts the eigenvalues of the sample
covariance ``C = F_c^T F_c / (n - 1)`` above ``rtol`` times the largest one::

    rank = #{ lambda_i(C) > rtol * lambda_max(C) },   rtol = 1e-3

Wide layers are first reduced to ``max_columns`` (8000) random columns, seeded and identical for every layer of the
same width. The nonzero eigenvalues of ``F_c^T F_c`` and ``F_c F_c^T`` are the same, so the covariance is formed on
the smaller side (exact, and cheap when n < d). Modes:

- ``"covariance"`` (paper / reimplementation default): features x features, columns subsampled;
- ``"gram"``: examples x examples, *rows* subsampled to ``max_rows`` (the reimplementation's ``aaT``);
- ``"svd"``: squared singular values of the centred features (the reimplementation's ``a``), no covariance formed.

All three threshold the same spectrum (``sigma_i(F_c)^2``) and differ only in which axis is subsampled; with no
subsampling they agree. The rank is at most ``min(n - 1, d)``; C well-separated class means give ``C - 1``.
"""

from __future__ import annotations

from typing import Literal

import torch

from lightning_methods.utils import seeded_generator

RankMode = Literal["covariance", "gram", "svd"]


def column_subset(d: int, max_columns: int | None, seed: int = 0) -> torch.Tensor | None:
    """Sorted positions of ``max_columns`` random columns out of ``d`` (None when no reduction is needed). Depends
    only on ``(d, max_columns, seed)``, so layers of equal width get the same columns."""
    if max_columns is None or d <= max_columns:
        return None
    if max_columns < 1:
        raise ValueError(f"max_columns must be >= 1, got {max_columns}")
    return torch.randperm(d, generator=seeded_generator(seed, d, 29))[:max_columns].sort().values


def spectrum(features: torch.Tensor, mode: RankMode = "covariance", max_columns: int | None = 8000,
             max_rows: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float64,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Eigenvalues (descending) of the centred second-moment matrix of ``features`` (n x d, or n x ... flattened),
    after the subsampling of ``mode``; normalised by ``n - 1`` like a sample covariance."""
    if mode not in ("covariance", "gram", "svd"):
        raise ValueError(f"rank mode must be 'covariance', 'gram' or 'svd', got {mode!r}")
    f = features.reshape(features.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError(f"the rank needs at least 2 samples, got {f.shape[0]}")
    if mode == "covariance":
        cols = column_subset(f.shape[1], max_columns, seed)
        if cols is not None:
            f = f[:, cols]
    elif max_rows is not None and f.shape[0] > max_rows:
        rows = torch.randperm(f.shape[0], generator=seeded_generator(seed, f.shape[0], 31))[:max_rows].sort().values
        f = f[rows]
    f = f.to(device=device if device is not None else f.device, dtype=dtype)
    f = f - f.mean(dim=0, keepdim=True)
    n = f.shape[0]
    if mode == "svd":
        return torch.linalg.svdvals(f).square().div(n - 1)
    small = f.T @ f if f.shape[1] <= n else f @ f.T
    return torch.linalg.eigvalsh(small / (n - 1)).flip(0)


def rank_from_spectrum(eigenvalues: torch.Tensor, rtol: float = 1e-3) -> int:
    """``#{lambda_i > rtol * max|lambda|}`` (``torch.linalg.matrix_rank(C, hermitian=True, rtol=rtol)``)."""
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    mags = eigenvalues.abs()
    top = mags.max()
    if top == 0:
        return 0
    return int((mags > rtol * top).sum())


def numerical_rank(features: torch.Tensor, rtol: float = 1e-3, max_columns: int | None = 8000,
                   mode: RankMode = "covariance", max_rows: int | None = None, seed: int = 0,
                   dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> int:
    """Numerical rank of a layer's representations (see the module docstring).

    Args:
        features: n x d (or n x C x H x W, flattened) features of n samples.
        rtol: eigenvalues above ``rtol * lambda_max`` count (paper: 1e-3).
        max_columns: columns kept (seeded) in ``"covariance"`` mode; None keeps all (reimplementation: 8000).
        mode: ``"covariance"``, ``"gram"`` or ``"svd"``.
        max_rows: rows kept (seeded) in ``"gram"`` / ``"svd"`` modes; None keeps all.
        seed: seed of the column / row subsets.
        dtype: compute dtype (float64 by default: thresholds 1e-3 below the top eigenvalue are far above its error).
        device: where to compute (default: where ``features`` live).

    Raises:
        ValueError: fewer than 2 samples, an unknown mode or rtol outside (0, 1).
    """
    values = spectrum(features, mode, max_columns=max_columns, max_rows=max_rows, seed=seed, dtype=dtype, device=device)
    return rank_from_spectrum(values, rtol)
