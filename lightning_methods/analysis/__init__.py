"""Analysis tools shared by method families: forward hooks, attention locality measures, numerical rank,
linear probes."""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.analysis.features": (
            "FeatureSet", "ProbePoint", "extract_features", "feature_bytes", "feature_dims",
        ),
        "lightning_methods.analysis.linear_probe": ("LinearProbe", "probe_accuracy", "train_linear_probes"),
        "lightning_methods.analysis.rank": ("column_subset", "numerical_rank"),
        "lightning_methods.analysis.attention": (
            "MAD_NORMS", "attention_locality", "locality_summary", "mean_attention_distance", "min_over_heads",
            "normalize_mad", "normalized_entropy", "patch_attention", "probe_indices",
        ),
        "lightning_methods.analysis.attention_extract": ("AttentionRecorder", "attention_modules"),
    },
)
