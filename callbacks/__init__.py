"""Callbacks of lightning-methods (installed as ``lightning_methods.callbacks``)."""

__all__: list[str] = []

from .ssam import SAMEpochSync, SSAMMaskCallback  # noqa: E402

__all__ += ["SAMEpochSync", "SSAMMaskCallback"]

from .deepkd_topk import TopKScheduleCallback  # noqa: E402

__all__ += ["TopKScheduleCallback"]

from .prediction_history import PredictionHistoryCallback  # noqa: E402
from .test_accuracy_tracker import TestAccuracyTracker  # noqa: E402

__all__ += ["PredictionHistoryCallback", "TestAccuracyTracker"]

from .koala_monitor import KOALAMonitor  # noqa: E402

__all__ += ["KOALAMonitor"]

from .checkpoint import LatestCheckpoint  # noqa: E402

__all__ += ["LatestCheckpoint"]

from .attention_locality import AttentionLocality  # noqa: E402

__all__ += ["AttentionLocality"]

from .gather_predictions import GatherPredictions  # noqa: E402
from .warmup_ema import WarmupEMA  # noqa: E402

__all__ += ["GatherPredictions", "WarmupEMA"]

from .bitwise_coreset import BitwiseCoresetCallback  # noqa: E402

__all__ += ["BitwiseCoresetCallback"]

from .tunnel_probe import TunnelProbe  # noqa: E402

__all__ += ["TunnelProbe"]

from .prediction_writer import PredictionWriter  # noqa: E402
from .results_writer import ResultsWriter  # noqa: E402

__all__ += ["PredictionWriter", "ResultsWriter"]

from .nonfinite_guard import NonFiniteGuard, NonFiniteTrainingError  # noqa: E402

__all__ += ["NonFiniteGuard", "NonFiniteTrainingError"]
