"""Loss functions of lightning-methods: pure functions of logits and targets."""

__all__: list[str] = []

from .kd import (  # noqa: E402
    dkd_loss,
    kd_loss,
    nckd_loss,
    standardize_logits,
    target_mask,
    tckd_loss,
    teacher_target_prob,
    topk_keep_mask,
)

__all__ += ["dkd_loss", "kd_loss", "nckd_loss", "standardize_logits", "target_mask", "tckd_loss",
            "teacher_target_prob", "topk_keep_mask"]

from .hpn import (  # noqa: E402
    cosine_regression_loss,
    hpn_classification_loss,
    multitask_loss,
    predict_class,
    prototype_cosines,
    regression_cosine_target,
    regression_prediction,
    upper_pole_cosine,
)

__all__ += ["cosine_regression_loss", "hpn_classification_loss", "multitask_loss", "predict_class",
            "prototype_cosines", "regression_cosine_target", "regression_prediction", "upper_pole_cosine"]
