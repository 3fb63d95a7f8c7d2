"""Analysis tools shared by method families: forward hooks, attention locality measures, numerical rank,
linear probes."""

__all__: list[str] = []

from .features import FeatureSet, ProbePoint, extract_features, feature_bytes, feature_dims  # noqa: E402
from .linear_probe import LinearProbe, probe_accuracy, train_linear_probes  # noqa: E402
from .rank import column_subset, numerical_rank  # noqa: E402

__all__ += ["FeatureSet", "LinearProbe", "ProbePoint", "column_subset", "extract_features", "feature_bytes",
            "feature_dims", "numerical_rank", "probe_accuracy", "train_linear_probes"]

from .attention import (  # noqa: E402
    MAD_NORMS,
    attention_locality,
    locality_summary,
    mean_attention_distance,
    min_over_heads,
    normalize_mad,
    normalized_entropy,
    patch_attention,
    probe_indices,
)
from .attention_extract import AttentionRecorder, attention_modules  # noqa: E402

__all__ += ["MAD_NORMS", "AttentionRecorder", "attention_locality", "attention_modules", "locality_summary",
            "mean_attention_distance", "min_over_heads", "normalize_mad", "normalized_entropy", "patch_attention",
            "probe_indices"]
