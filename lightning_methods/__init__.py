"""lightning-methods: recent CIFAR-100 research methods as PyTorch Lightning parts.

Public classes are re-exported here, e.g. ``from lightning_methods import ImageClassifier``.
"""

from .classifier import ImageClassifier
from .models import available_backbones, create_backbone
from .parameters import frozen_bn_stats, param_groups_by_role, parameter_roles

__version__ = "0.1.0"

__all__ = [
    "ImageClassifier",
    "available_backbones",
    "create_backbone",
    "frozen_bn_stats",
    "param_groups_by_role",
    "parameter_roles",
]

from .distillation import DistillationClassifier  # noqa: E402

__all__ += ["DistillationClassifier"]

from .noisy_labels import CoTrainingClassifier, EMAModel  # noqa: E402

__all__ += ["CoTrainingClassifier", "EMAModel"]

from .utils.deprecation import renamed_attributes  # noqa: E402

__getattr__ = renamed_attributes(
    __name__, {"DistillationModule": "DistillationClassifier", "CoTrainingModule": "CoTrainingClassifier"}
)
