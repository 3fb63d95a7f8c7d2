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

from .tinyimagenet import TinyImageNetDataModule, load_tinyimagenet_split  # noqa: E402

__all__ += ["TinyImageNetDataModule", "load_tinyimagenet_split"]

from .celeba import CelebADataModule  # noqa: E402
from .corruptions import CORRUPTIONS, corrupt  # noqa: E402
from .covariate_shift import CIFARCDataModule, CorruptedDataModule, datamodule_split  # noqa: E402
from .dtd import DTDDataModule  # noqa: E402
from .mnist import MNISTDataModule, read_idx  # noqa: E402
from .ood_images import OODImageDataModule, read_image_list  # noqa: E402
from .places365 import Places365DataModule  # noqa: E402
from .sample_patches import SamplePatchesDataModule, sample_patches  # noqa: E402
from .svhn import SVHNDataModule, read_svhn_mat  # noqa: E402

__all__ += ["CORRUPTIONS", "CIFARCDataModule", "CelebADataModule", "CorruptedDataModule", "DTDDataModule",
            "MNISTDataModule", "OODImageDataModule", "Places365DataModule", "SVHNDataModule", "SamplePatchesDataModule",
            "corrupt", "datamodule_split", "read_idx", "read_image_list", "read_svhn_mat", "sample_patches"]

from .digits_regression import DigitsRegressionDataModule, digit_regression_values  # noqa: E402

__all__ += ["DigitsRegressionDataModule", "digit_regression_values"]

from .federated import FederatedDataModule  # noqa: E402

__all__ += ["FederatedDataModule"]

from .cinic10 import CINIC10DataModule, read_cinic_split  # noqa: E402

__all__ += ["CINIC10DataModule", "read_cinic_split"]
