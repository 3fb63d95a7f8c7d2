"""Loss functions of lightning-methods: pure functions of logits and targets."""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.losses.kd": (
            "dkd_loss", "kd_loss", "nckd_loss", "standardize_logits", "target_mask", "tckd_loss",
            "teacher_target_prob", "topk_keep_mask",
        ),
        "lightning_methods.losses.hpn": (
            "cosine_regression_loss", "hpn_classification_loss", "multitask_loss", "predict_class",
            "prototype_cosines", "regression_cosine_target", "regression_prediction", "upper_pole_cosine",
        ),
    },
)
