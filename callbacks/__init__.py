"""Callbacks of lightning-methods (installed as ``lightning_methods.callbacks``)."""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.callbacks.sam_epoch_sync": ("SAMEpochSync",),
        "lightning_methods.callbacks.ssam_mask": ("SSAMMaskCallback",),
        "lightning_methods.callbacks.deepkd_topk": ("TopKScheduleCallback",),
        "lightning_methods.callbacks.prediction_history": ("PredictionHistoryCallback",),
        "lightning_methods.callbacks.accuracy_tracker": ("TestAccuracyTracker",),
        "lightning_methods.callbacks.koala_monitor": ("KOALAMonitor",),
        "lightning_methods.callbacks.checkpoint": ("LatestCheckpoint",),
        "lightning_methods.callbacks.attention_locality": ("AttentionLocality",),
        "lightning_methods.callbacks.gather_predictions": ("GatherPredictions",),
        "lightning_methods.callbacks.warmup_ema": ("WarmupEMA",),
        "lightning_methods.callbacks.bitwise_coreset": ("BitwiseCoresetCallback",),
        "lightning_methods.callbacks.tunnel_probe": ("TunnelProbe",),
        "lightning_methods.callbacks.prediction_writer": ("PredictionWriter",),
        "lightning_methods.callbacks.results_writer": ("ResultsWriter",),
        "lightning_methods.callbacks.nonfinite_guard": (
            "DivergedTrainingError", "NonFiniteGuard", "NonFiniteTrainingError",
        ),
    },
)
