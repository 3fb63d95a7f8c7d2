"""DataModules of lightning-methods (installed as ``lightning_methods.datamodules``).

Every DataModule yields dict batches ``{"image": float NCHW, "target": int64, "index": int64}``.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.datamodules.base": (
            "DeviceBatchLoader", "EpochShuffleSampler", "ImageDataModule", "IndexedTensorDataset", "collate_dict",
            "epoch_permutation",
        ),
        "lightning_methods.datamodules.cifar": (
            "CIFAR10DataModule", "CIFAR100DataModule", "CIFARDataModule", "read_cifar_batch",
        ),
        "lightning_methods.datamodules.digits": ("DigitsDataModule", "load_digits_uint8"),
        "lightning_methods.datamodules.label_noise": ("make_noisy_labels", "read_cifarn_labels"),
        "lightning_methods.datamodules.noisy_cifar": ("NoisyCIFAR10DataModule", "NoisyCIFAR100DataModule"),
        "lightning_methods.datamodules.noisy_digits": ("NoisyDigitsDataModule",),
        "lightning_methods.datamodules.tinyimagenet": ("TinyImageNetDataModule", "load_tinyimagenet_split"),
        "lightning_methods.datamodules.celeba": ("CelebADataModule",),
        "lightning_methods.datamodules.corruptions": ("CORRUPTIONS", "corrupt"),
        "lightning_methods.datamodules.covariate_shift": (
            "CIFARCDataModule", "CorruptedDataModule", "datamodule_split",
        ),
        "lightning_methods.datamodules.dtd": ("DTDDataModule",),
        "lightning_methods.datamodules.mnist": ("MNISTDataModule", "read_idx"),
        "lightning_methods.datamodules.ood_images": ("OODImageDataModule", "read_image_list"),
        "lightning_methods.datamodules.places365": ("Places365DataModule",),
        "lightning_methods.datamodules.sample_patches": ("SamplePatchesDataModule", "sample_patches"),
        "lightning_methods.datamodules.svhn": ("SVHNDataModule", "read_svhn_mat"),
        "lightning_methods.datamodules.digits_regression": ("DigitsRegressionDataModule", "digit_regression_values"),
        "lightning_methods.datamodules.federated": ("FederatedDataModule",),
        "lightning_methods.datamodules.cinic10": ("CINIC10DataModule", "read_cinic_split"),
        "lightning_methods.datamodules.imagenet": ("ImageNet200DataModule", "ImageNetDataModule"),
        "lightning_methods.datamodules.imagenet_noisy": ("NoisyImageNetDataModule", "WebVisionDataModule"),
        "lightning_methods.datamodules.imagenet_files": ("read_class_list", "read_val_ground_truth"),
    },
)
