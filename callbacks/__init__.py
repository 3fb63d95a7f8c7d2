"""Callbacks of lightning-methods (installed as ``lightning_methods.callbacks``)."""

__all__: list[str] = []

from .ssam import SAMEpochSync, SSAMMaskCallback  # noqa: E402

__all__ += ["SAMEpochSync", "SSAMMaskCallback"]

from .topk import TopKScheduleCallback  # noqa: E402

__all__ += ["TopKScheduleCallback"]

from .history import PredictionHistoryCallback  # noqa: E402
from .history_tracker import TestAccuracyTracker  # noqa: E402

__all__ += ["PredictionHistoryCallback", "TestAccuracyTracker"]
