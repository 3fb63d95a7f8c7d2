"""Settings of the multi-round Early Cutting procedure (the ``selection:`` section of a select config).

Yuan et al., "Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy Examples", arXiv 2502.08227.
Defaults are the official CIFAR-100 40%-noise command (``--i_rate_3 3 --remove_rate_3 0.84 --newremove_rate 3000
--early_cutting_rate 1.5 --warm_up_epochs 6``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SelectionConfig:
    """Selection rounds, learning-time rule and the cut.

    Args:
        rounds: selection rounds before the final round (official ``i_rate_3``: 3).
        keep_rate: fraction of a round's training set at which the round stops and selects (official
            ``remove_rate_3``: 0.84 at 40% noise, 0.925 at 20%, 0.85 for CIFAR-10 40%); one value or one per round.
        k: consecutive recorded epochs with the same prediction, equal to the label (official "phase" 3); one value or
            one per round.
        warm_up_epochs: epochs with 0-based index ``<= warm_up_epochs`` are not recorded (6).
        lag: the selection at the end of epoch ``e`` uses records of epochs ``<= e - lag`` (official: 1).
        history_transform: predict the training set with (``"train"``, official) or without (``"eval"``) augmentation.
        early_cutting: recalibrate round 0 with the best noisy-validation checkpoint (False: the learning-time
            selection alone, the ablation).
        cutting_rate: re-examine the first ``int(|FkL| / cutting_rate)`` selected samples (1.5).
        loss_select: ``"count"``: the ``num_candidates`` highest-loss samples (official, 3000); ``"quantile"``: the
            top ``loss_quantile`` fraction (paper wording, 10%).
        num_candidates: number of loss candidates for ``loss_select="count"``.
        loss_quantile: loss fraction for ``loss_select="quantile"``.
        conf_quantile: top fraction of the candidates by confidence (0.2).
        grad_quantile: bottom fraction of the candidates by input-gradient norm (0.2).
        final_round: train a final model on the final selection.
        on_threshold_not_reached: when a round never reaches its threshold: ``"stop"`` (official: no further rounds,
            no final round) or ``"final"`` (skip to the final round with the last complete selection).
        score_batch_size: batch size of the loss / gradient scoring of the cut.
        store_predictions: also save every round's N x epochs prediction matrix in ``round<r>/history.pt``.
    """

    rounds: int = 3
    keep_rate: float | list[float] = 0.84
    k: int | list[int] = 3
    warm_up_epochs: int = 6
    lag: int = 1
    history_transform: Literal["train", "eval"] = "train"
    early_cutting: bool = True
    cutting_rate: float = 1.5
    loss_select: Literal["count", "quantile"] = "count"
    num_candidates: int = 3000
    loss_quantile: float = 0.1
    conf_quantile: float = 0.2
    grad_quantile: float = 0.2
    final_round: bool = True
    on_threshold_not_reached: Literal["stop", "final"] = "stop"
    score_batch_size: int = 256
    store_predictions: bool = True

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"selection.rounds must be >= 0, got {self.rounds}")
        for name in ("keep_rate", "k"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.rounds:
                raise ValueError(f"selection.{name} has {len(value)} entries for {self.rounds} rounds")
        for rate in self.keep_rate if isinstance(self.keep_rate, list) else [self.keep_rate]:
            if not 0 < rate <= 1:
                raise ValueError(f"selection.keep_rate must be in (0, 1], got {rate}")
        if self.cutting_rate <= 0:
            raise ValueError(f"selection.cutting_rate must be > 0, got {self.cutting_rate}")
        for name in ("loss_quantile", "conf_quantile", "grad_quantile"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"selection.{name} must be in [0, 1]")

    def keep_rate_of(self, r: int) -> float:
        return self.keep_rate[r] if isinstance(self.keep_rate, list) else self.keep_rate

    def k_of(self, r: int) -> int:
        return self.k[r] if isinstance(self.k, list) else self.k
