"""DataModules of lightning-methods (installed as ``lightning_methods.datamodules``).

Every DataModule yields dict batches ``{"image": float NCHW, "target": int64, "index": int64}``.
"""

from .base import (
    DeviceBatchLoader,
    EpochShuffleSampler,
    ImageDataModule,
    IndexedTensorDataset,
    collate_dict,
    epoch_permutation,
)
from .cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule, read_cifar_batch
from .digits import DigitsDataModule, load_digits_uint8

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "DeviceBatchLoader",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "ImageDataModule",
    "IndexedTensorDataset",
    "collate_dict",
    "epoch_permutation",
    "load_digits_uint8",
    "read_cifar_batch",
]

from .label_noise import make_noisy_labels, read_cifarn_labels  # noqa: E402
from .noisy_cifar import NoisyCIFAR10DataModule, NoisyCIFAR100DataModule  # noqa: E402
from .noisy_digits import NoisyDigitsDataModule  # noqa: E402

__all__ += ["NoisyCIFAR10DataModule", "NoisyCIFAR100DataModule", "NoisyDigitsDataModule", "make_noisy_labels",
            "read_cifarn_labels"]

from .digits_regression import DigitsRegressionDataModule, digit_regression_values  # noqa: E402

__all__ += ["DigitsRegressionDataModule", "digit_regression_values"]

from .federated import FederatedDataModule  # noqa: E402

__all__ += ["FederatedDataModule"]
