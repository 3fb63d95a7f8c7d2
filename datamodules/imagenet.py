"""ImageNet-scale DataModules: ILSVRC2012 (and class subsets) and HPN's ImageNet-200 (noisy ImageNet and mini-WebVision:
``imagenet_noisy.py``).

Data come from a folder tree in the usual layout (``<data_dir>/train/<wnid>/*.JPEG``, ``<data_dir>/val/<wnid>/*``:
sort the flat validation folder once with ``lightning-methods prepare-data sort-val``) or, with ``streaming``, from a
data set converted once by ``lightning-methods prepare-data convert`` into litdata's streaming format (a local folder
or an ``s3://`` URL; each rank reads its own shard, every sample once per epoch, and a mid-epoch checkpoint resumes
at the next unseen sample).

Training: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)) and a horizontal flip, drawn per sample from
``(seed, epoch, index)``, then normalization with the ImageNet mean / std. Evaluation: resize the shorter side to
``eval_resize`` (256), center crop ``image_size`` (224). With ``decode_on_device`` (default: when training on CUDA)
workers only read bytes and the JPEG decoding, cropping and flipping run batched on the device
(``torchvision.io.decode_jpeg(device="cuda")``; on a CPU trainer, ``decode_threads`` threads of the training process),
uint8 until normalization; otherwise they run in the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_methods.datamodules.base import ImageDataModule, collate_dict, training_sampler
from lightning_methods.datamodules.imagenet_files import (
    list_class_folders,
    read_class_list,
    scan_image_folder,
)
from lightning_methods.datamodules.jpeg_dataset import EpochTaggedSampler, JpegFileDataset
from lightning_methods.datamodules.jpeg_pipeline import RATIO, SCALE, decode_batch, normalize_uint8
from lightning_methods.datamodules.transforms import device_augment, mix_batch
from lightning_methods.utils.seeding import mix_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOST_KEYS = ("jpeg", "jpeg_offsets", "box", "flip")  # stay on the host: nvJPEG takes host bytes
TrainTransform = Literal["random_resized_crop", "pad_crop"]


class ImageNetDataModule(ImageDataModule):
    """ILSVRC2012 (or a class subset of it) from class folders or a converted streaming data set.

    Args:
        data_dir: the folder with ``train/<wnid>/`` and ``val/<wnid>/`` (ignored with ``streaming``).
        streaming: a folder or ``s3://`` URL written by ``lightning-methods prepare-data convert`` (with ``train/`` and
            ``val/`` inside); needs the ``streaming`` extra (litdata).
        image_size: training crop and evaluation center-crop side (224).
        eval_resize: shorter side before the evaluation center crop (256).
        decode_on_device: decode and augment on the training device (default: when it is a CUDA device). On a CPU
            trainer this decodes in the training process with ``decode_threads`` threads instead of in the workers.
        decode_threads: threads that decode a batch when ``decode_on_device`` runs on the CPU (default: torch's
            intra-op thread count).
        num_classes: classes of the tree (checked against its class folders; ``class_subset`` / ``classes_file``
            set it).
        class_subset: the first ``k`` classes (sorted wnids) or a list of wnids, in label order.
        classes_file: a file listing the wnids to use, one per line, in label order.
        scale, ratio: RandomResizedCrop ranges.
        train_transform: ``random_resized_crop`` (ImageNet) or ``pad_crop`` (the evaluation resize / crop, then a
            pad-4 random crop and flip on the device, HPN's ImageNet-200 recipe at 64 px).
        streaming_cache_dir: local cache of a remote streaming data set (default: litdata's).
        batch_size: per-device training batch size.
        num_workers: DataLoader workers (decode and augmentation run there unless ``decode_on_device``).
        augment: ``standard`` (crop + flip), ``crop`` (no flip) or ``none`` (train on the evaluation crop).
        **kwargs: the rest of :class:`ImageDataModule` (``eval_batch_size``, ``val_split``, ``cutmix_alpha``,
            ``mixup_alpha``, ``seed``, ``pin_memory``), by keyword.
    """

    num_classes = 1000
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    train_folder, eval_folder = "train", "val"

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        streaming: str | None = None,
        image_size: int = 224,
        eval_resize: int = 256,
        decode_on_device: bool | None = None,
        decode_threads: int | None = None,
        num_classes: int = 1000,
        class_subset: list[str] | int | None = None,
        classes_file: str | None = None,
        scale: tuple[float, float] = SCALE,
        ratio: tuple[float, float] = RATIO,
        train_transform: TrainTransform = "random_resized_crop",
        streaming_cache_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 8,
        **kwargs: Any,
    ) -> None:
        if class_subset is not None and classes_file is not None:
            raise ValueError("give class_subset or classes_file, not both")
        # the real class count before save_hyperparameters (in the base) records ``num_classes``: the hparams, the
        # model's linked num_classes and a logger's merged hparams must all agree
        classes: list[str] | None = None
        if classes_file is not None:
            classes = read_class_list(classes_file)
        elif isinstance(class_subset, (list, tuple)):
            classes = list(class_subset)
        if classes is not None:
            num_classes = len(classes)
        elif isinstance(class_subset, int):
            num_classes = class_subset
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        if self.augment not in ("standard", "crop", "none"):
            raise ValueError(f"augment={self.augment!r} is a CIFAR policy; ImageNet DataModules take 'standard', "
                             "'crop' or 'none'")
        if self.gpu_resident:
            raise ValueError("gpu_resident=True keeps a whole uint8 data set on the device, which ImageNet-scale data "
                             "does not fit; use decode_on_device=True instead")
        if train_transform not in ("random_resized_crop", "pad_crop"):
            raise ValueError(f"train_transform must be 'random_resized_crop' or 'pad_crop', got {train_transform!r}")
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
        self.data_dir = Path(data_dir).expanduser()
        self.streaming, self.streaming_cache_dir = streaming, streaming_cache_dir
        self.image_size, self.eval_resize = image_size, eval_resize
        if decode_threads is not None and decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1, got {decode_threads}")
        self.decode_on_device, self.decode_threads = decode_on_device, decode_threads
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.train_transform = train_transform
        self.class_subset, self.classes_file = class_subset, classes_file
        self.classes = classes
        self.num_classes = num_classes
        if self.hparams.get("num_classes") != num_classes:  # a subclass's own default (ImageNet-200: 200) was saved
            self.hparams["num_classes"] = num_classes
            self._hparams_initial["num_classes"] = num_classes  # what a logger records and merges with the model's
        self.full_train_set: JpegFileDataset | None = None

    # ------------------------------------------------------------------------------------------ data
    def resolve_classes(self) -> list[str]:
        """The ordered class ids of the tree (label ``c`` = position ``c``)."""
        if self.classes is not None:
            return self.classes
        folders = list_class_folders(self.data_dir / self.train_folder)
        if isinstance(self.class_subset, int):
            if self.class_subset > len(folders):
                raise ValueError(f"class_subset={self.class_subset} but {self.data_dir / self.train_folder} has "
                                 f"{len(folders)} class folders")
            return folders[: self.class_subset]
        if len(folders) != self.num_classes:
            raise ValueError(f"{self.data_dir / self.train_folder} has {len(folders)} class folders but "
                             f"num_classes={self.num_classes}: set --data.num_classes {len(folders)}, or choose "
                             "classes with class_subset / classes_file")
        return folders

    def train_files(self, classes: list[str]) -> tuple[list[str], list[int]]:
        return scan_image_folder(self.data_dir / self.train_folder, classes)

    def eval_files(self, classes: list[str]) -> tuple[list[str], list[int]]:
        return scan_image_folder(self.data_dir / self.eval_folder, classes)

    def _dataset(self, files: list[str], targets: Any, **kwargs: Any) -> JpegFileDataset:
        return JpegFileDataset(files, torch.as_tensor(targets, dtype=torch.long), image_size=self.image_size,
                               eval_resize=self.eval_resize, seed=self.seed, scale=self.scale, ratio=self.ratio,
                               flip=self.augment == "standard", **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.streaming:
            from lightning_methods.datamodules.streaming import setup_streaming

            setup_streaming(self)
            return
        classes = self.resolve_classes()
        files, labels = self.train_files(classes)
        clean = torch.tensor(labels, dtype=torch.long)
        extras = self.train_targets(None, clean)  # type: ignore[arg-type]  (no pixels: file-backed)
        target = extras.pop("target")
        full = self._dataset(files, target, extras=extras)
        train_pos, val_pos = self.holdout_split(len(files))
        # ``train_set[i]`` gives a training sample as the workers decode it (SSAM-F's Fisher pass draws from it)
        self.train_set = full.subset(train_pos, self.train_item_mode())
        eval_files, eval_labels = self.eval_files(classes)
        self.test_set = self._dataset(eval_files, eval_labels)
        self.val_set = full.subset(val_pos, "eval") if len(val_pos) else self.test_set

    # ------------------------------------------------------------------------------------------ loaders
    def device_decode(self) -> bool:
        """Whether batches are decoded on the training device (``decode_on_device``, default: on CUDA)."""
        if self.decode_on_device is not None:
            return self.decode_on_device
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_item_mode(self) -> str:
        """The decoded training sample: ``train`` (RandomResizedCrop + flip) or ``eval`` (the evaluation crop, for
        ``pad_crop``, whose augmentation runs on the device, and ``augment="none"``)."""
        random_crop = self.train_transform == "random_resized_crop" and self.augment != "none"
        return "train" if random_crop else "eval"

    def train_mode(self) -> str:
        """What the training loader ships: :meth:`train_item_mode`, as bytes when decoding on the device."""
        return self.train_item_mode() + ("_bytes" if self.device_decode() else "")

    def _file_loader(self, dataset: JpegFileDataset, train: bool) -> DataLoader:
        mode = self.train_mode() if train else "eval_bytes" if self.device_decode() else "eval"
        return DataLoader(
            dataset.with_mode(mode),
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=training_sampler(EpochTaggedSampler(len(dataset), self.seed), self.trainer) if train else None,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=collate_dict,
        )

    def _loader(self, dataset: Any, train: bool) -> Any:
        if self.streaming:
            from lightning_methods.datamodules.streaming import streaming_loader

            return streaming_loader(self, dataset, train)
        return self._file_loader(dataset, train)

    def train_dataloader(self) -> Any:
        self._require("train_set")
        return self._loader(self.train_set, train=True)

    # ------------------------------------------------------------------------------------------ device side
    def sample_name(self, index: int, training: bool) -> str:
        """The file of the sample with base index ``index`` in the training set or the evaluation set the trainer is
        reading (for the error of an image decoded on the device, where the batch carries bytes, not paths)."""
        trainer = self.trainer
        if training:
            dataset = self.train_set
        else:
            dataset = self.test_set if trainer is not None and (trainer.testing or trainer.predicting) else self.val_set
        files, indices = getattr(dataset, "files", None), getattr(dataset, "indices", None)
        if files is not None and indices is not None:
            hit = (torch.as_tensor(indices) == index).nonzero().flatten()
            if len(hit):
                return str(files[int(hit[0])])
        return f"sample index {index}" + (f" of {self.streaming}" if self.streaming else "")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "jpeg" in batch:
            host = {k: batch.pop(k) for k in HOST_KEYS if k in batch}
            batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
            batch.update(host)
        else:
            batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if "jpeg" in batch:
            host = {k: batch.pop(k) for k in HOST_KEYS if k in batch}
            index = batch["index"]
            training = self.trainer.training if self.trainer is not None else "box" in host
            batch["image"] = decode_batch(host, self.image_size, batch["target"].device, self.eval_resize,
                                          threads=self.decode_threads or torch.get_num_threads(),
                                          name_of=lambda i: self.sample_name(int(index[i]), training))
        image = batch["image"]
        if image.dtype != torch.uint8:
            return batch
        training = self.trainer is not None and self.trainer.training
        seed = mix_seed(self.seed, self.trainer.global_step, self.trainer.global_rank) if training else 0
        if training and self.train_transform == "pad_crop" and self.augment != "none":
            image = device_augment(image, self.augment, torch.Generator(device=image.device).manual_seed(seed))
        batch["image"] = normalize_uint8(image, self.mean, self.std)
        if training and (self.cutmix_alpha > 0 or self.mixup_alpha > 0):
            batch["image"], batch["soft_target"] = mix_batch(
                batch["image"],
                batch["target"],
                self.num_classes,
                cutmix_alpha=self.cutmix_alpha,
                mixup_alpha=self.mixup_alpha,
                rng=np.random.default_rng(seed),
            )
        return batch


class ImageNet200DataModule(ImageNetDataModule):
    """ImageNet-200 of Hyperspherical Prototype Networks (Mettes et al., arXiv 1901.10514): 200 ImageNet classes
    named by a class list file, trained as the official code does at 64 px (the evaluation resize / crop to 64, then
    a pad-4 random crop and flip).

    Args:
        classes_file: the 200 wnids, one per line (Tiny-ImageNet's ``wnids.txt`` lists the usual 200).
        **kwargs: see :class:`ImageNetDataModule`.
    """

    num_classes = 200

    def __init__(self, classes_file: str | None = None, image_size: int = 64, eval_resize: int = 64,
                 train_transform: TrainTransform = "pad_crop", num_classes: int = 200, **kwargs: Any) -> None:
        super().__init__(classes_file=classes_file, image_size=image_size, eval_resize=eval_resize,
                         train_transform=train_transform, num_classes=num_classes, **kwargs)

    def resolve_classes(self) -> list[str]:
        if self.classes is None:
            raise ValueError("ImageNet200DataModule needs classes_file: a text file with the 200 wnids of ImageNet-200 "
                             "(one per line, e.g. Tiny-ImageNet's wnids.txt)")
        return self.classes
