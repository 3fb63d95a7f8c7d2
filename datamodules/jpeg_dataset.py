"""Datasets of encoded images (files in a folder tree or a list file) with the package's dict items.

:class:`JpegFileDataset` is an :class:`IndexedTensorDataset` whose ``images`` are decoded on access
(:class:`LazyJpegImages`, at the evaluation crop), so code written for the in-memory datasets - the sample-selection
callbacks and the Early Cutting scorer index ``dataset.images[positions]`` - works on file trees unchanged. The
training loader instead asks for whole batches through ``__getitems__`` with ``(position, epoch)`` keys from
:class:`EpochTaggedSampler` and gets, per the dataset's ``mode``:

- ``"train"``: decoded, RandomResizedCrop + flip in the worker, uint8 ``(N, 3, S, S)`` under ``"image"``;
- ``"train_bytes"``: the file bytes packed with their crop boxes and flips, decoded later on the device;
- ``"eval"``: decoded, resized and center-cropped in the worker;
- ``"eval_bytes"``: the file bytes only (decoded and center-cropped on the device).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.utils.data import Sampler, get_worker_info

from lightning_methods.datamodules.base import IndexedTensorDataset, epoch_permutation
from lightning_methods.datamodules.jpeg_pipeline import (
    RATIO,
    SCALE,
    BadImageError,
    decode_rgb,
    eval_resize_crop,
    pack_jpegs,
    rgb_jpeg_bytes,
    sample_augmentation,
    train_image,
)

MODES = ("train", "train_bytes", "eval", "eval_bytes")


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise BadImageError(f"{path}: cannot read the file ({err})") from err


class LazyJpegImages:
    """Read-only view of image files as a uint8 ``(N, 3, S, S)`` "tensor" at the evaluation crop: indexing with an
    int gives one decoded image, with a sequence / tensor of positions a stacked batch (decoded by ``threads``)."""

    dtype = torch.uint8
    ndim = 4

    def __init__(self, files: Sequence[str], size: int, resize: int, threads: int = 4) -> None:
        self.files, self.size, self.resize, self.threads = files, size, resize, threads

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, self.size, self.size)

    def load(self, i: int) -> torch.Tensor:
        path = self.files[i]
        return eval_resize_crop(decode_rgb(rgb_jpeg_bytes(read_bytes(path), path)[0], path), self.resize, self.size)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, int) or (isinstance(idx, torch.Tensor) and idx.ndim == 0):
            return self.load(int(idx))
        pos = [int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)]
        if not pos:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        with ThreadPoolExecutor(max_workers=max(1, min(self.threads, len(pos)))) as pool:
            return torch.stack(list(pool.map(self.load, pos)))


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """The training order of :class:`EpochShuffleSampler` (a function of ``(seed, epoch)``), each position tagged with
    the epoch: ``(position, epoch)``, so workers draw the augmentation of ``(seed, epoch, index)`` even with
    persistent workers. Lightning forwards ``set_epoch`` (also through its DDP sampler wrapper); a training loader
    gets it through ``training_sampler`` (see there)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)
        return iter([(p, self.epoch) for p in order.tolist()])


class JpegFileDataset(IndexedTensorDataset):
    """Image files with targets, base indices and extras (see the module docstring).

    Args:
        files: image paths (JPEG; PNG or CMYK files are re-encoded on the fly where bytes are shipped).
        targets: int64 labels.
        indices: base indices (positions in the full training split; default ``0..N-1``).
        mode: what a loader receives (``train``, ``train_bytes``, ``eval``, ``eval_bytes``).
        image_size: output side ``S``.
        eval_resize: shorter side before the evaluation center crop.
        seed: augmentation seed.
        scale, ratio: RandomResizedCrop ranges.
        flip: random horizontal flip in training modes.
        extras: per-sample tensors added to every item.
    """

    def __init__(self, files: Sequence[str], targets: torch.Tensor, indices: torch.Tensor | None = None,
                 mode: str = "eval", image_size: int = 224, eval_resize: int = 256, seed: int = 0,
                 scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO, flip: bool = True,
                 extras: dict[str, torch.Tensor] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if len(files) != len(targets):
            raise ValueError(f"{len(files)} files but {len(targets)} targets")
        self.files = list(files)
        self.images = LazyJpegImages(self.files, image_size, eval_resize)
        self.targets = torch.as_tensor(targets).long()
        self.indices = torch.arange(len(self.files)) if indices is None else torch.as_tensor(indices).long()
        self.transform = None
        self.extras = extras or {}
        self.mode, self.image_size, self.eval_resize, self.seed = mode, image_size, eval_resize, seed
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip

    def subset(self, pos: torch.Tensor, mode: str | None = None) -> JpegFileDataset:
        """The samples at ``pos`` (positions into this dataset), keeping their base indices."""
        pos = torch.as_tensor(pos).long()
        return JpegFileDataset(
            [self.files[i] for i in pos.tolist()],
            self.targets[pos],
            self.indices[pos],
            mode=mode or self.mode,
            image_size=self.image_size,
            eval_resize=self.eval_resize,
            seed=self.seed,
            scale=self.scale,
            ratio=self.ratio,
            flip=self.flip,
            extras={k: v[pos] for k, v in self.extras.items()},
        )

    def with_mode(self, mode: str) -> JpegFileDataset:
        return self.subset(torch.arange(len(self)), mode)

    # ------------------------------------------------------------------------------------------ items
    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """One sample (unbatched: ``image`` ``(3, S, S)`` in the decoding modes, ``jpeg`` bytes otherwise); ``key``
        is a position or ``(position, epoch)``."""
        pos, epoch = (int(key), 0) if not isinstance(key, (tuple, list)) else (int(key[0]), int(key[1]))
        path = self.files[pos]
        sample = encode_sample(
            read_bytes(path),
            self.targets[pos],
            self.indices[pos],
            mode=self.mode,
            seed=self.seed,
            epoch=epoch,
            size=self.image_size,
            eval_resize=self.eval_resize,
            flip=self.flip,
            scale=self.scale,
            ratio=self.ratio,
            name=path,
        )
        sample.update({k: v[pos] for k, v in self.extras.items()})
        return sample

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> dict[str, Any]:
        """A whole batch (the DataLoader's fetch path): samples collated by :func:`collate_samples`."""
        return collate_samples([self[key] for key in keys], self.image_size)


def encode_sample(data: bytes, target: Any, index: Any, mode: str, seed: int, epoch: int, size: int,
                  eval_resize: int, flip: bool = True, scale: Sequence[float] = SCALE,
                  ratio: Sequence[float] = RATIO, name: str = "<bytes>") -> dict[str, Any]:
    """One sample as the loaders ship it (see the module docstring for ``mode``); the training crop and flip are
    drawn from ``(seed, epoch, index)``."""
    out: dict[str, Any] = {
        "target": torch.as_tensor(target, dtype=torch.long),
        "index": torch.as_tensor(index, dtype=torch.long),
    }
    if mode == "train":
        out["image"] = train_image(
            data, seed, epoch, index=int(index), size=size, flip=flip, scale=scale, ratio=ratio, name=name
        )
    elif mode == "eval":
        # the bytes the other paths decode (PNG / CMYK / grayscale files re-encoded as RGB JPEG, as in ``eval_bytes``
        # and ``convert``): decoding the original instead gave those files other evaluation pixels here
        out["image"] = eval_resize_crop(decode_rgb(rgb_jpeg_bytes(data, name)[0], name), eval_resize, size)
    else:
        data, h, w = rgb_jpeg_bytes(data, name)
        out["jpeg"] = data
        if mode == "train_bytes":
            box, flipped = sample_augmentation(
                seed, epoch, int(index), height=h, width=w, flip=flip, scale=scale, ratio=ratio
            )
            out["box"], out["flip"] = torch.tensor(box, dtype=torch.long), torch.tensor(flipped)
    return out


def collate_samples(samples: list[dict[str, Any]], size: int = 0) -> dict[str, Any]:
    """Batch samples of :func:`encode_sample`: images stacked, encoded bytes packed into one tensor + offsets."""
    if not samples:
        return {"image": torch.empty(0, 3, size, size, dtype=torch.uint8),
                "target": torch.empty(0, dtype=torch.long), "index": torch.empty(0, dtype=torch.long)}
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "jpeg":
            batch["jpeg"], batch["jpeg_offsets"] = pack_jpegs(values)
        elif key == "image" and get_worker_info() is not None:
            batch[key] = torch.stack(values, out=shared_empty((len(values), *values[0].shape), values[0].dtype))
        else:
            batch[key] = torch.stack(values)
    return batch


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in shared memory: a worker that builds its batch there hands it to the training
    process without copying it (what torch's ``default_collate`` does for tensors, with the same storage method; a
    torch without it gets ordinary memory, which the DataLoader then copies into shared memory as before)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return torch.empty(tuple(shape), dtype=dtype)
    storage = new_shared(math.prod(shape) * torch.empty(0, dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))
