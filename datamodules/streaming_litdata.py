"""litdata's classes as the streaming path uses them (see :mod:`~lightning_methods.datamodules.streaming`).

A module of their own, imported only where streaming data is used, so the package imports without the optional
litdata, and at module level, so a data set pickles into DataLoader workers started by ``spawn`` (the default on
macOS; a class made inside a function cannot be pickled).
"""

from __future__ import annotations

from typing import Any

from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.item_loader import Interval
from litdata.streaming.shuffle import NoShuffle
from litdata.utilities.env import _DistributedEnv
from litdata.utilities.shuffle import _associate_chunks_and_intervals_to_workers

from lightning_methods.datamodules.jpeg_dataset import encode_sample


def balanced_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, end)`` ranges covering ``range(total)`` whose sizes differ by at most one (the
    first ``total % parts`` get one more)."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + base + (part < extra))
    return list(zip(bounds[:-1], bounds[1:]))


class StreamingJpegDataset(StreamingDataset):
    """Streaming samples decoded / augmented (or shipped as bytes) per ``mode``, keyed ``(seed, epoch, index)``.
    ``mode`` can be changed with :meth:`set_mode` before a loader iterates; an int index (random access, as
    ``dataset[i]`` of SSAM-F's Fisher pass) always gives a decoded sample (a ``*_bytes`` mode without the
    ``_bytes``) with the augmentation of epoch 0, as the folder path's ``dataset[i]``."""

    def __init__(self, input_dir: str, mode: str = "eval", image_size: int = 224, eval_resize: int = 256,
                 aug_seed: int = 0, scale: tuple = (0.08, 1.0), ratio: tuple = (0.75, 4 / 3), flip: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(input_dir, **kwargs)
        self.mode, self.image_size, self.eval_resize, self.aug_seed = mode, image_size, eval_resize, aug_seed
        self.aug_scale, self.aug_ratio, self.aug_flip = tuple(scale), tuple(ratio), flip

    def set_mode(self, mode: str) -> None:
        self.mode = mode

    def _create_shuffler(self, cache: Any) -> Any:
        """Evaluation (no shuffle, no drop_last) shares the samples evenly between the ranks (see
        :class:`BalancedNoShuffle`); training keeps litdata's own assignment."""
        if self.shuffle or self.drop_last or self._state_dict is not None:
            return super()._create_shuffler(cache)
        return BalancedNoShuffle(cache, self.seed, False)

    def __getitem__(self, index: Any) -> dict[str, Any]:
        item = super().__getitem__(index)
        direct = isinstance(index, int)  # random access: the folder path's ``dataset[i]`` (epoch 0)
        mode = self.mode.removesuffix("_bytes") if direct else self.mode
        return encode_sample(
            item["jpeg"],
            int(item["label"]),
            int(item["index"]),
            mode=mode,
            seed=self.aug_seed,
            epoch=0 if direct else int(self.current_epoch) - 1,  # litdata counts epochs from 1
            size=self.image_size,
            eval_resize=self.eval_resize,
            flip=self.aug_flip,
            scale=self.aug_scale,
            ratio=self.aug_ratio,
            name=f"{self.input_dir.url or self.input_dir.path}[{item['index']}]",
        )


class BalancedNoShuffle(NoShuffle):
    """litdata's ``NoShuffle`` (evaluation: no shuffle, no drop_last) with the samples shared evenly between the
    ranks: rank ``r`` gets the ``r``-th of ``world_size`` contiguous parts of the data set (sizes differing by at most
    one, in the stored order), which litdata's own rule then splits between the rank's DataLoader workers in whole
    batches.

    litdata's rule gives each rank ``floor(N / batch / world_size)`` batches and the last rank every sample left:
    with the ImageNet validation set (50,000 images, batch 128, 8 GPUs) 6,144 samples per rank and 6,992 on the last,
    and with fewer than ``batch x world_size`` samples nothing at all on the other ranks, whose empty loaders stop
    Lightning's evaluation ("within local rank has zero length")."""

    def get_chunks_and_intervals_per_workers(self, distributed_env: Any, num_workers: int, batch_size: int,
                                             current_epoch: int) -> Any:
        intervals = self.cache.get_chunk_intervals()
        starts = [0]  # position of each chunk's first sample in the whole data set
        for _chunk_start, roi_start, roi_end, _chunk_end in intervals:
            starts.append(starts[-1] + roi_end - roi_start)
        one_rank = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
        workers_chunks: list[list[int]] = []
        workers_intervals: list[Any] = []
        for first, last in balanced_ranges(starts[-1], distributed_env.world_size):
            chunks, pieces = [], []
            for index, (chunk_start, roi_start, _roi_end, chunk_end) in enumerate(intervals):
                lo, hi = max(first, starts[index]), min(last, starts[index + 1])
                if lo < hi:  # the part of this chunk that falls in [first, last)
                    offset = roi_start - starts[index]
                    chunks.append(index)
                    pieces.append(Interval(chunk_start, lo + offset, hi + offset, chunk_end))
            rank_chunks, rank_intervals = _associate_chunks_and_intervals_to_workers(
                one_rank, chunks, pieces, False, num_workers, batch_size)
            workers_chunks += rank_chunks
            workers_intervals += rank_intervals
        return workers_chunks, workers_intervals


class ResumableStreamingDataLoader(StreamingDataLoader):
    """litdata's ``StreamingDataLoader`` that also leaves its "resumed" state once the resumed epoch has yielded its
    last batch.

    litdata clears that state only when an epoch's generator runs to its end, but Lightning stops asking after the
    epoch's known number of batches, so without this the epoch after a mid-epoch resume would replay the rest of the
    resumed epoch instead of starting a new one."""

    _resumed_epoch_done = False

    def __iter__(self) -> Any:
        if self.restore and self._resumed_epoch_done:
            self.restore = False
        self._resumed_epoch_done = False
        resumed = self.restore
        total = len(self) * (self.batch_size or 1)
        for batch in super().__iter__():
            if resumed and self._num_samples_yielded_streaming >= total:
                self._resumed_epoch_done = True
            yield batch
