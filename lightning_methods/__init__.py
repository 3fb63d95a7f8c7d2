"""lightning-methods: recent CIFAR-100 research methods as PyTorch Lightning parts.

Public classes are re-exported here, e.g. ``from lightning_methods import ImageClassifier``.
"""

from lightning_methods._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.classifier": ("ImageClassifier",),
        "lightning_methods.models": ("available_backbones", "create_backbone"),
        "lightning_methods.parameters": ("frozen_bn_stats", "param_groups_by_role", "parameter_roles"),
        "lightning_methods.distillation": (
            "DKDClassifier", "DeepKDClassifier", "DistillationClassifier", "KDClassifier", "KDDeepKDClassifier",
        ),
        "lightning_methods.noisy_labels": ("CoTrainingClassifier", "EMAModel"),
    },
)
