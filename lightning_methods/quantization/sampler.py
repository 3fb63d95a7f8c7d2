"""Training loaders that read one rank's pre-computed order of per-bit coreset batches (see ``bitwise_epoch_order``).

:class:`RankOrderSampler` subclasses ``DistributedSampler`` on purpose: Lightning then leaves it alone under DDP
(it injects a ``DistributedSamplerWrapper`` only around samplers that are not distributed samplers), because the
order is already this rank's shard, computed identically on every rank from the shared subsets and ``(seed, epoch)``.
:func:`bitwise_loader` rebuilds the DataModule's training loader around it (same dataset, workers, collate, pinning),
with a batch of ``len(bits) * batch_size`` samples: one chunk per bit-width, high to low.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_methods.datamodules import DeviceBatchLoader


class RankOrderSampler(DistributedSampler):
    """Yields a fixed list of dataset positions (one rank's order for one epoch).

    Args:
        dataset: the training set (for ``DistributedSampler``'s bookkeeping only).
        order: the positions, in order.
        rank: this process's rank.
        world_size: number of ranks.
        epoch: when given and the dataset augments in its workers (a ``transform``), each position is yielded as
            ``(position, epoch)``, the key with which the package's datasets seed that transform (see
            ``EpochShuffleSampler``): a resumed run draws the same augmentation.
    """

    def __init__(self, dataset: Dataset, order: torch.Tensor, rank: int = 0, world_size: int = 1,
                 epoch: int | None = None) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        self.order = order.tolist()
        if epoch is not None and getattr(dataset, "transform", None) is not None:
            self.order = [(p, int(epoch)) for p in self.order]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class DeviceOrderLoader:
    """The GPU-resident counterpart: slices batches of a ``DeviceBatchLoader``'s on-device tensors by ``order``."""

    def __init__(self, base: DeviceBatchLoader, order: torch.Tensor, batch_size: int) -> None:
        self.base, self.batch_size = base, batch_size
        self.order = order.to(base.device)

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.order), self.batch_size):
            idx = self.order[start : start + self.batch_size]
            batch = {"image": self.base.images.index_select(0, idx)}
            batch.update({k: v.index_select(0, idx) for k, v in self.base.tensors.items()})
            yield batch


def bitwise_loader(loader: Any, order: torch.Tensor, n_bits: int, rank: int, world_size: int,
                   epoch: int | None = None) -> Any:
    """The training loader ``loader`` rebuilt to read ``order`` in batches of ``n_bits * loader.batch_size``
    (``epoch`` seeds a worker-side augmentation, see :class:`RankOrderSampler`).

    Raises:
        TypeError: for a loader that is neither a ``DataLoader`` with ``batch_size`` nor a ``DeviceBatchLoader``.
    """
    if isinstance(loader, DeviceBatchLoader):
        return DeviceOrderLoader(loader, order, n_bits * loader.batch_size)
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise TypeError(
            "per-bit coreset batches need the DataModule's training loader to be a torch DataLoader with batch_size "
            f"(or the package's gpu_resident loader), got {type(loader).__name__}"
        )
    kwargs: dict[str, Any] = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                  pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                                  multiprocessing_context=loader.multiprocessing_context, timeout=loader.timeout)
    if loader.num_workers > 0:
        kwargs.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
    sampler = RankOrderSampler(loader.dataset, order, rank, world_size, epoch)
    return DataLoader(loader.dataset, batch_size=n_bits * loader.batch_size, sampler=sampler, drop_last=False,
                      **kwargs)
