"""Settings of a tunnel probe (Masarczyk et al., *The Tunnel Effect*, NeurIPS 2023, arXiv 2305.19753): which layers,
how many samples, how features are stored, the linear-probe and rank settings, and the tunnel-start threshold.
Defaults follow the reimplementation DHLSmith/jons-tunnel-effect where it fixes them, our choices elsewhere
(docs/methods/tunnel.md lists the source of each)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_methods.analysis.features import storage_dtype


@dataclass
class ProbeSettings:
    """Settings of a tunnel probe (every one is written into the report's summary).

    Args:
        points: module names to probe (``"module"`` or ``"module:relu"``); None = the backbone's default points.
        include_head: probe the output layer (logits) too.
        pool_size: average-pool feature maps to at most ``pool_size`` x ``pool_size`` before flattening (None: the
            paper's flattened features; never compare pooled with unpooled numbers).
        max_train_samples: seeded subset of the training split for the probes (None: all).
        max_test_samples: seeded subset of the test split for accuracy and rank (None: all; use >= 8000 for rank).
        feature_dtype: host storage of the features, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        extract_batch_size: batch size of the feature-extraction passes.
        probe_solver: ``"lbfgs"`` (default): every linear probe is fitted to convergence (full-batch L-BFGS on the
            cached features; a probe of the logits then reaches the model's accuracy); ``"adam"``: the
            reimplementation's fixed loop (``probe_epochs`` epochs of Adam, which under-fits on small data).
        probe_max_iter: L-BFGS iterations per probe at most (1000).
        probe_tol: L-BFGS stops when the largest gradient entry of the mean cross-entropy is below this (1e-6).
        probe_epochs: Adam: epochs of the linear probes (30).
        probe_batch_size: Adam: batch size of the probes (512); L-BFGS: rows per chunk of the loss (memory only).
        probe_lr: Adam learning rate of the probes (1e-3).
        probe_weight_decay: L2 coefficient of the probes (Adam's weight decay; 0).
        rank_rtol: relative eigenvalue threshold of the numerical rank (1e-3).
        rank_max_columns: columns kept (seeded) for the rank (8000; None keeps all).
        rank_mode: ``"covariance"`` (paper), ``"gram"`` or ``"svd"`` (see ``analysis.rank``).
        rank_dtype: compute dtype of the rank, ``"float64"`` or ``"float32"``.
        tunnel_threshold: the tunnel starts at the first layer with accuracy >= this fraction of the best (0.95).
        ood_classes: OOD class subset: a number of classes drawn with ``seed``, a list of class ids, or None (all).
        seed: seed of the sample subsets, probe initialisation and order, rank columns and OOD classes.
        memory_budget_gb: stop before extraction when the features of the largest split would exceed this many GiB
            of host memory (None: no check).
        device_cache_gb: keep the training features of the probes on the device when they fit in this many GiB
            (faster on GPUs); otherwise batches are copied from host memory.
    """

    points: list[str] | None = None
    include_head: bool = True
    pool_size: int | None = None
    max_train_samples: int | None = 10000
    max_test_samples: int | None = None
    feature_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    extract_batch_size: int = 256
    probe_solver: Literal["lbfgs", "adam"] = "lbfgs"
    probe_max_iter: int = 1000
    probe_tol: float = 1e-6
    probe_epochs: int = 30
    probe_batch_size: int = 512
    probe_lr: float = 1e-3
    probe_weight_decay: float = 0.0
    rank_rtol: float = 1e-3
    rank_max_columns: int | None = 8000
    rank_mode: Literal["covariance", "gram", "svd"] = "covariance"
    rank_dtype: Literal["float64", "float32"] = "float64"
    tunnel_threshold: float = 0.95
    ood_classes: int | list[int] | None = 10
    seed: int = 0
    memory_budget_gb: float | None = 16.0
    device_cache_gb: float = 4.0

    def __post_init__(self) -> None:
        storage_dtype(self.feature_dtype)
        checks = {"pool_size": (self.pool_size, 1), "max_train_samples": (self.max_train_samples, 2),
                  "max_test_samples": (self.max_test_samples, 2), "extract_batch_size": (self.extract_batch_size, 1),
                  "probe_batch_size": (self.probe_batch_size, 1), "probe_epochs": (self.probe_epochs, 1),
                  "rank_max_columns": (self.rank_max_columns, 1), "probe_max_iter": (self.probe_max_iter, 1)}
        for key, (value, low) in checks.items():
            if value is not None and value < low:
                raise ValueError(f"{key} must be >= {low} (or None where allowed), got {value}")
        if not 0.0 < self.tunnel_threshold <= 1.0:
            raise ValueError(f"tunnel_threshold must be in (0, 1], got {self.tunnel_threshold}")
        if not 0.0 < self.rank_rtol < 1.0:
            raise ValueError(f"rank_rtol must be in (0, 1), got {self.rank_rtol}")
        if self.probe_solver not in ("lbfgs", "adam"):
            raise ValueError(f"probe_solver must be 'lbfgs' or 'adam', got {self.probe_solver!r}")
        if not self.probe_tol > 0:
            raise ValueError(f"probe_tol must be > 0, got {self.probe_tol}")
        if self.rank_dtype not in ("float64", "float32"):
            raise ValueError(f"rank_dtype must be 'float64' or 'float32', got {self.rank_dtype!r}")
