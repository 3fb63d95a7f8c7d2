"""Streaming ImageNet-scale data: litdata's ``StreamingDataset`` / ``StreamingDataLoader`` over a data set written by
``lightning-methods prepare-data convert`` (``<root>/train`` and ``<root>/val``, each a litdata-optimized folder whose
samples are ``{"jpeg": undecoded bytes, "label": int, "index": int}``).

- Each rank reads its own part of the chunks and every sample at most once per epoch (litdata's distributed
  sharding; with more than one process the last incomplete part is dropped so all ranks step alike).
- The training loader is a ``StreamingDataLoader``: Lightning stores its ``state_dict`` in every checkpoint (the
  fit loop keeps the state of stateful loaders) and a run resumed from a mid-epoch checkpoint continues with the next
  unseen sample.
- Items go through the same decode / augmentation code as the folder path (``jpeg_dataset.encode_sample``), with
  the crop of a sample drawn from ``(seed, epoch, index)``.

litdata is an optional dependency: ``pip install 'lightning-methods[streaming]'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_methods.datamodules.jpeg_dataset import collate_samples, encode_sample

EXTRA = "pip install 'lightning-methods[streaming]'  (litdata)"


def require_litdata() -> Any:
    """Import litdata or stop with the extra to install."""
    try:
        import litdata
    except ImportError as err:
        raise ImportError(f"streaming data needs the litdata package: {EXTRA}") from err
    return litdata


def split_url(root: str, split: str) -> str:
    """``<root>/<split>`` for local folders and ``s3://`` / ``gs://`` URLs alike."""
    return root.rstrip("/") + "/" + split


META = "lightning_methods.json"


def _s3_object(root: str) -> tuple[Any, str, str]:
    """``(boto3 S3 client, bucket, key)`` of ``<root>/lightning_methods.json`` for an ``s3://`` root (boto3 comes with
    litdata; it reads the usual AWS credentials and ``AWS_ENDPOINT_URL`` for S3-compatible stores)."""
    import boto3

    bucket, _, prefix = root[len("s3://"):].partition("/")
    return boto3.client("s3"), bucket, f"{prefix.strip('/')}/{META}".lstrip("/")


def write_meta(root: str, meta: dict[str, Any]) -> bool:
    """Write ``meta`` as ``<root>/lightning_methods.json`` beside ``train/`` and ``val/``: a local folder or an
    ``s3://`` URL (other remote schemes: not written, returns False)."""
    text = json.dumps(meta, indent=1) + "\n"
    if root.startswith("s3://"):
        client, bucket, key = _s3_object(root)
        client.put_object(Bucket=bucket, Key=key, Body=text.encode(), ContentType="application/json")
        return True
    if "://" in root:
        return False
    Path(root).expanduser().joinpath(META).write_text(text)
    return True


def read_meta(root: str) -> dict[str, Any] | None:
    """``lightning_methods.json`` written by ``prepare-data convert`` next to ``train/`` (a local folder or an
    ``s3://`` URL; ``None`` where there is none, e.g. a data set converted by an older version or another tool)."""
    if root.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        client, bucket, key = _s3_object(root)
        try:
            return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except (ClientError, BotoCoreError) as err:
            if isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise OSError(f"cannot read s3://{bucket}/{key}: {err}; check the AWS credentials (AWS_PROFILE or "
                          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and, for an S3-compatible store, "
                          "AWS_ENDPOINT_URL") from err
    if "://" in root:
        return None
    path = Path(root).expanduser() / META
    return json.loads(path.read_text()) if path.is_file() else None


def make_streaming_dataset(url: str, mode: str, shuffle: bool, dm: Any, **kwargs: Any) -> Any:
    """A :class:`StreamingJpegDataset` over ``url`` (see :func:`streaming_dataset_class`)."""
    cls = streaming_dataset_class()
    return cls(url, mode=mode, image_size=dm.image_size, eval_resize=dm.eval_resize, aug_seed=dm.seed,
               scale=dm.scale, ratio=dm.ratio, flip=dm.augment == "standard", shuffle=shuffle, seed=dm.seed,
               cache_dir=dm.streaming_cache_dir, **kwargs)


_CLASS: Any = None


def streaming_dataset_class() -> Any:
    """``StreamingJpegDataset``: litdata's ``StreamingDataset`` whose items are encoded like the folder path's (built
    on first use so that litdata stays an optional import)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    litdata = require_litdata()

    class StreamingJpegDataset(litdata.StreamingDataset):
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

    _CLASS = StreamingJpegDataset
    return _CLASS


def setup_streaming(dm: Any) -> None:
    """Build ``train_set`` / ``val_set`` / ``test_set`` of an ImageNet DataModule from ``dm.streaming``."""
    require_litdata()
    meta = read_meta(dm.streaming)
    if meta is not None and int(meta.get("num_classes", dm.num_classes)) != dm.num_classes:
        raise ValueError(f"{dm.streaming} holds {meta['num_classes']} classes (lightning_methods.json) but "
                         f"num_classes={dm.num_classes}; set --data.num_classes {meta['num_classes']}")
    if dm.val_split > 0:
        raise ValueError("val_split > 0 holds out part of the training folder; with streaming data validate on the "
                         "converted val/ split (val_split=0)")
    dm.train_set = make_streaming_dataset(split_url(dm.streaming, "train"), dm.train_item_mode(), True, dm)
    # evaluation keeps every sample (ranks may get one batch more or less; Lightning syncs metrics at epoch end)
    dm.test_set = make_streaming_dataset(split_url(dm.streaming, "val"), "eval", False, dm, drop_last=False)
    dm.val_set = dm.test_set


_LOADER: Any = None


def resumable_loader_class() -> Any:
    """``ResumableStreamingDataLoader``: litdata's ``StreamingDataLoader`` that also leaves its "resumed" state once
    the resumed epoch has yielded its last batch.

    litdata clears that state only when an epoch's generator runs to its end, but Lightning stops asking after the
    epoch's known number of batches, so without this the epoch after a mid-epoch resume would replay the rest of the
    resumed epoch instead of starting a new one."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    from litdata import StreamingDataLoader

    class ResumableStreamingDataLoader(StreamingDataLoader):
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

    _LOADER = ResumableStreamingDataLoader
    return _LOADER


def streaming_loader(dm: Any, dataset: Any, train: bool) -> Any:
    """A (resumable) ``StreamingDataLoader`` over ``dataset`` in the DataModule's train / eval mode."""
    dataset.set_mode(dm.train_mode() if train else "eval_bytes" if dm.device_decode() else "eval")
    return resumable_loader_class()(dataset, batch_size=dm.batch_size if train else dm.eval_batch_size,
                                    num_workers=dm.num_workers, pin_memory=dm.pin_memory,
                                    collate_fn=collate_samples, drop_last=train)
