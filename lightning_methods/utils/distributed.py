"""Distributed helpers that work with and without an initialized process group (then they are identities).

Used wherever state must stay identical on every rank (optimizer statistics, masks, selections, probes) and wherever
per-sample results are gathered (the ``DistributedSampler`` pads shards by repeating samples: gather by index and
keep one entry per index).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def is_distributed() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank: the process group's, or, before it exists, the one a launcher put in the
    environment (``RANK``, then ``LOCAL_RANK`` with ``NODE_RANK`` / ``LOCAL_WORLD_SIZE``, then ``SLURM_PROCID``), so
    code that runs before ``Trainer.fit`` (run directories, locks) already knows whether it is rank zero in a process
    started by Lightning's DDP launcher or torchrun; 0 otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "LOCAL_RANK" in env:
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1)))
        return int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))) * local_world + int(env["LOCAL_RANK"])
    return int(env.get("SLURM_PROCID", 0))


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """``dist.barrier()`` inside a process group, nothing otherwise."""
    if is_distributed():
        dist.barrier()


def leave_process_group() -> None:
    """Destroy the default process group, all ranks together: a barrier first (a rank that exits while its peer still
    holds the group's connections makes the peer's gloo thread abort the process), then a short pause before the
    destruction. A gloo thread frees each finished collective's state under the GIL; a group destroyed at once (its
    threads joined with the GIL held) can leave both waiting forever, depending on timing (seen in tests: with torch
    2.13 in about one run in three of the SAM DDP test, once with torch 2.6 in the tunnel probe's). Sleeping releases
    the GIL so those threads finish. Nothing happens without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
        time.sleep(0.2)
    dist.destroy_process_group()


def all_reduce_flat(tensors: Sequence[torch.Tensor], op: Literal["sum", "mean"] = "sum") -> list[torch.Tensor]:
    """Reduce several tensors over the ranks with one collective: they are flattened into one buffer (in the dtype
    of the first), reduced, and returned as new tensors of the original shapes and dtypes. Without a process group
    the inputs are returned (as a list) unchanged."""
    tensors = list(tensors)
    if not tensors or not is_distributed():
        return tensors
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if op == "mean":
        flat.div_(dist.get_world_size())
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return out


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, in one collective (boolean tensors travel as
    uint8). Nothing happens without a process group."""
    tensors = list(tensors)
    if not tensors or not is_distributed():
        return
    wire = torch.uint8 if tensors[0].dtype == torch.bool else tensors[0].dtype
    flat = torch.cat([t.reshape(-1).to(wire) for t in tensors])
    dist.broadcast(flat, src)
    start = 0
    for t in tensors:
        t.copy_(flat[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_gather_padded(t: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Concatenate ``t`` (variable first dimension) from every rank, rank order."""
    if all_gather is not None:  # e.g. LightningModule.all_gather (equal shard lengths)
        return all_gather(t).reshape(-1, *t.shape[1:])
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_int = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes_int), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_int)])


def gather_by_index(index: torch.Tensor, *values: torch.Tensor,
                    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Gather per-sample tensors from every rank and keep one entry per ``index`` (the first rank's), sorted by
    index: ``(index, *values)``, identical on every rank. Removes the duplicates a padding ``DistributedSampler``
    adds. Shards may have different lengths (padded internally), unless ``all_gather`` is given (e.g.
    ``pl_module.all_gather``, which needs equal lengths). Without a process group it only sorts and deduplicates."""
    if is_distributed():
        index = _all_gather_padded(index, all_gather)
        values = tuple(_all_gather_padded(v, all_gather) for v in values)
    sorted_idx, order = torch.sort(index, stable=True)
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    sel = order[keep]
    return (index[sel], *(v[sel] for v in values))


def gather_columns(local: dict[str, torch.Tensor] | None, device: torch.device | str,
                   what: str = "the predict dataloader") -> dict[str, torch.Tensor]:
    """:func:`gather_by_index` of named per-sample columns (``"index"`` first), as CPU tensors identical on every rank.

    A rank without rows (``local=None``: a shard shorter than the world size, a custom sampler) contributes an empty
    shard: every rank first shares its columns' names, dtypes and per-sample shapes (one small object gather), so
    every rank enters the same collectives.

    Raises:
        RuntimeError: no rank has rows, or two ranks' columns differ (raised on every rank alike); ``what`` names the
            source in the message.
    """
    mine = None if local is None else {"columns": {k: (v.dtype, tuple(v.shape[1:])) for k, v in local.items()},
                                       "device": next(iter(local.values())).device.type}
    layouts = [mine]
    if is_distributed():
        layouts = [None] * get_world_size()
        dist.all_gather_object(layouts, mine)
    found = [(rank, lay) for rank, lay in enumerate(layouts) if lay is not None]
    if not found:
        raise RuntimeError(f"{what} yielded no batch on any rank")
    first_rank, layout = found[0]
    for rank, lay in found[1:]:
        if lay != layout:
            raise RuntimeError(f"{what}: the outputs of rank {rank} ({lay}) differ from those of rank {first_rank} "
                               f"({layout}) in their entries, dtypes or per-sample shapes")
    if local is None:  # an empty shard of the columns the other ranks share, on the device type they gather on
        device = torch.device(device)
        device = device if device.type == layout["device"] else torch.device(layout["device"])
        local = {k: torch.empty((0, *shape), dtype=dtype, device=device)
                 for k, (dtype, shape) in layout["columns"].items()}
    keys = list(layout["columns"])
    gathered = gather_by_index(local["index"], *(local[k] for k in keys[1:]))
    return {k: v.cpu() for k, v in zip(keys, gathered)}


def sharded_loader(dataset: Dataset, batch_size: int, num_workers: int = 0,
                   collate_fn: Callable[[Any], Any] | None = None, rank: int | None = None,
                   world_size: int | None = None) -> DataLoader:
    """An unshuffled loader over ``dataset``, sharded by rank with a padding ``DistributedSampler`` when more than
    one rank runs (combine with :func:`gather_by_index`)."""
    world = get_world_size() if world_size is None else world_size
    sampler = None
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=get_rank() if rank is None else rank,
                                     shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_fn)
