"""Federated CIFAR-10 / CIFAR-100 / digits: one data set partitioned across clients, one client's loaders at a time.

The partition (:func:`lightning_methods.federated.partition.make_client_split`: pathological, HtFLlib pathological,
Dirichlet or IID; optionally HtFLlib's merge-then-split with per-client 75/25 local train / test) is a function of
``seed`` only, so every process (the in-process runner, each Flower ClientApp) builds the same one. Batches are the
package's dict batches plus ``"client"``. ``set_client(client, round)`` selects whose data the loaders serve; the
training order and on-device augmentation of a client-round are drawn from ``(seed, client, round)``, never from the
global RNG, so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_methods.datamodules.base import (
    Augment,
    EpochShuffleSampler,
    ImageDataModule,
    IndexedTensorDataset,
    collate_dict,
)
from lightning_methods.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_methods.federated.partition import PartitionSettings
from lightning_methods.utils import atomic_write_json, mix_seed

Source = Literal["cifar10", "cifar100", "digits", "tinyimagenet"]


class FederatedDataModule(ImageDataModule):
    """A data set split across ``num_clients`` clients with local train and test sets.

    Args:
        dataset: ``"cifar10"``, ``"cifar100"`` (official pickle release under ``data_dir``), ``"tinyimagenet"``
            (the official ``tiny-imagenet-200/`` release under ``data_dir``, 200 classes, 64x64) or ``"digits"``
            (scikit-learn's bundled digits, 32x32x3, a seeded stratified 75/25 train / test split; offline).
        data_dir: directory holding (or receiving) the CIFAR release folder.
        download: download CIFAR with torchvision when missing.
        partition: how the data set is split across clients
            (:class:`~lightning_methods.federated.partition.PartitionSettings`: ``num_clients``, ``scheme``,
            ``classes_per_client``, ``alpha``, ``merge``, ``train_fraction``, ``balance``, ``min_samples``; a
            mapping of those keys is accepted too). In YAML: ``data: {partition: {num_clients: 20, scheme:
            pathological, classes_per_client: 10}}``.
        batch_size: local training batch size (FedFree / HtFLlib: 10).
        eval_batch_size: batch size of evaluation loaders.
        num_workers: DataLoader workers (0: the uint8 tensors are indexed in the main process, which avoids
            starting workers for every client-round).
        augment: on-device augmentation (``"none"`` as HtFLlib; ``"standard"`` crop + flip for CIFAR).
        shuffle: reshuffle the local training set every epoch (``False``: HtFLlib's fixed order).
        seed: seed of the partition and of every client-round's data order and augmentation.
        pin_memory: pin host memory (default: when CUDA is available).
    """

    def __init__(
        self,
        dataset: Source = "cifar100",
        data_dir: str = "data",
        download: bool = True,
        partition: PartitionSettings | None = None,
        batch_size: int = 10,
        eval_batch_size: int | None = 256,
        num_workers: int = 0,
        augment: Augment = "none",
        shuffle: bool = True,
        seed: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         augment=augment, seed=seed, pin_memory=pin_memory)
        if dataset not in ("cifar10", "cifar100", "digits", "tinyimagenet"):
            raise ValueError(f"dataset must be 'cifar10', 'cifar100', 'tinyimagenet' or 'digits', got {dataset!r}")
        if augment == "autoaugment":
            raise ValueError("augment='autoaugment' is not supported by FederatedDataModule; use 'standard' or 'none'")
        self.dataset, self.data_dir, self.download = dataset, Path(data_dir).expanduser(), download
        if partition is None:
            partition = PartitionSettings()
        elif not isinstance(partition, PartitionSettings):
            partition = PartitionSettings(**dict(partition))
        self.partition, self.num_clients, self.shuffle = partition, partition.num_clients, shuffle
        if dataset != "digits":
            source = self._source_class()
            self.mean, self.std = source.mean, source.std
        self.num_classes = 10 if dataset == "digits" else source.num_classes
        self.client, self.round, self.stream_seed = 0, 0, mix_seed(seed, 0, 0) % 2**31
        self.client_train: list[IndexedTensorDataset] = []
        self.client_test: list[IndexedTensorDataset] = []
        self.stats: list[dict] = []

    # ------------------------------------------------------------------------------------------ data
    def _source_class(self) -> type[ImageDataModule]:
        if self.dataset == "tinyimagenet":
            from lightning_methods.datamodules.tinyimagenet import TinyImageNetDataModule

            return TinyImageNetDataModule
        return CIFAR100DataModule if self.dataset == "cifar100" else CIFAR10DataModule

    def _cifar(self) -> ImageDataModule:
        """The single-node DataModule of the source data set (CIFAR or Tiny-ImageNet), which reads the files."""
        return self._source_class()(data_dir=str(self.data_dir), download=self.download)

    def prepare_data(self) -> None:
        if self.dataset != "digits":
            self._cifar().prepare_data()

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.dataset != "digits":
            return self._cifar().load_splits()
        from lightning_methods.datamodules.digits import load_digits_uint8

        images, targets = load_digits_uint8()
        rng = np.random.RandomState(self.seed)
        test = np.concatenate([rng.permutation(np.flatnonzero(targets.numpy() == c))[: round(0.25 * int(
            (targets == c).sum()))] for c in range(10)])
        mask = torch.ones(len(targets), dtype=torch.bool)
        mask[torch.from_numpy(test)] = False
        return {"train": (images[mask], targets[mask]), "test": (images[~mask], targets[~mask])}

    def setup(self, stage: str | None = None) -> None:
        if self.client_train:
            return
        from lightning_methods.federated.partition import make_client_split

        splits = self.load_splits()
        (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
        images, labels = torch.cat([train_x, test_x]), torch.cat([train_y, test_y]).long()
        split = make_client_split(train_y.numpy(), test_y.numpy(), self.partition, num_classes=self.num_classes,
                                  seed=self.seed)
        if self.dataset == "digits":  # normalise with the training pool's statistics, as DigitsDataModule does
            pool = images[: len(train_x)].float() / 255
            self.mean = tuple(pool.mean(dim=(0, 2, 3)).tolist())
            self.std = tuple(pool.std(dim=(0, 2, 3)).tolist())

        def dataset(pos: np.ndarray, client: int) -> IndexedTensorDataset:
            p = torch.from_numpy(np.asarray(pos, dtype=np.int64))
            return IndexedTensorDataset(images[p], labels[p], p, extras={"client": torch.full((len(p),), client)})

        self.client_train = [dataset(p, i) for i, p in enumerate(split.train)]
        self.client_test = [dataset(p, i) for i, p in enumerate(split.test)]
        self.stats = split.statistics(labels.numpy(), self.num_classes)
        self.train_set, self.test_set = self.client_train[self.client], self.client_test[self.client]
        self.val_set = self.test_set

    @property
    def image_size(self) -> int:
        """Height = width of the images the clients see: after ``setup`` the shape of the loaded training images,
        before it the source's native size (64 for Tiny-ImageNet, 32 for CIFAR and the upscaled digits)."""
        if not self.client_train:
            return 64 if self.dataset == "tinyimagenet" else 32
        height, width = (int(v) for v in self.client_train[0].images.shape[-2:])
        if height != width:
            raise ValueError(f"federated client models need square images; {self.dataset} under {self.data_dir} "
                             f"has {height}x{width} images")
        return height

    def write_statistics(self, path: str | Path) -> Path:
        """Write the per-client partition statistics as JSON (call after ``setup``)."""
        return atomic_write_json(path, {"dataset": self.dataset, "partition": self.partition.scheme,
                                        "num_clients": self.num_clients, "clients": self.stats})

    def statistics_summary(self) -> dict[str, float]:
        """Scalar summary of the partition (for logging): sizes and classes per client."""
        train = np.array([s["train"] for s in self.stats])
        classes = np.array([len(s["classes"]) for s in self.stats])
        return {"partition/train_min": int(train.min()), "partition/train_max": int(train.max()),
                "partition/train_mean": float(train.mean()), "partition/classes_mean": float(classes.mean()),
                "partition/classes_min": int(classes.min()), "partition/classes_max": int(classes.max())}

    # ------------------------------------------------------------------------------------------ clients
    def set_client(self, client: int, round: int = 0) -> None:
        """Serve ``client``'s data; its order and augmentation in this round come from ``(seed, client, round)``."""
        if not self.client_train:
            self.setup()
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client {client} does not exist (num_clients={self.num_clients})")
        self.client, self.round = client, round
        self.stream_seed = mix_seed(self.seed, client, round) % 2**31  # epoch_permutation needs a small seed
        self.train_set, self.test_set = self.client_train[client], self.client_test[client]
        self.val_set = self.test_set

    def train_sizes(self) -> list[int]:
        return [len(d) for d in self.client_train]

    def client_loader(self, client: int, split: Literal["train", "test"] = "test", train: bool = False,
                      seed: int | None = None) -> DataLoader:
        """A loader over one client's local ``split`` (evaluation order unless ``train``: training batches, shuffled
        by ``seed``, default the current client-round's)."""
        if not self.client_train:
            self.setup()
        data = (self.client_train if split == "train" else self.client_test)[client]
        return self._loader(data, train=train, seed=seed)

    def _loader(self, dataset: IndexedTensorDataset, train: bool, seed: int | None = None) -> DataLoader:
        drop_last = train and len(dataset) >= self.batch_size
        seed = self.stream_seed if seed is None else seed % 2**31
        sampler = EpochShuffleSampler(len(dataset), seed) if train and self.shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size, sampler=sampler,
                          drop_last=drop_last, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory,
                          collate_fn=collate_dict)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        seed, self.seed = self.seed, self.stream_seed  # augmentation keyed by (seed, client, round, step)
        try:
            return super().on_after_batch_transfer(batch, dataloader_idx)
        finally:
            self.seed = seed

    def normalize_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device-side preprocessing for evaluation outside a Trainer (normalisation only)."""
        from lightning_methods.datamodules.transforms import normalize

        if batch["image"].dtype == torch.uint8:
            batch = dict(batch, image=normalize(batch["image"], self.mean, self.std))
        return batch
