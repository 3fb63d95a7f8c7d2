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
- Evaluation keeps every sample, each on one rank, shared evenly between the ranks.
- ``lightning_methods.json`` beside ``train/`` and ``val/`` (local or ``s3://``) holds the classes and counts.

litdata is an optional dependency: ``pip install 'lightning-methods[streaming]'``; its subclasses live in
:mod:`~lightning_methods.datamodules.streaming_litdata`, imported where streaming data is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_methods.datamodules.jpeg_dataset import collate_samples

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
    """A ``StreamingJpegDataset`` (:mod:`~lightning_methods.datamodules.streaming_litdata`) over ``url``."""
    require_litdata()
    from lightning_methods.datamodules.streaming_litdata import StreamingJpegDataset

    return StreamingJpegDataset(url, mode=mode, image_size=dm.image_size, eval_resize=dm.eval_resize,
                                aug_seed=dm.seed, scale=dm.scale, ratio=dm.ratio, flip=dm.augment == "standard",
                                shuffle=shuffle, seed=dm.seed, cache_dir=dm.streaming_cache_dir, **kwargs)


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
    # evaluation keeps every sample, shared evenly between the ranks (streaming_litdata.BalancedNoShuffle: one batch
    # more or less on a rank; Lightning syncs the metrics at the epoch's end)
    dm.test_set = make_streaming_dataset(split_url(dm.streaming, "val"), "eval", False, dm, drop_last=False)
    dm.val_set = dm.test_set


def streaming_loader(dm: Any, dataset: Any, train: bool) -> Any:
    """A (resumable) ``StreamingDataLoader`` over ``dataset`` in the DataModule's train / eval mode."""
    dataset.set_mode(dm.train_mode() if train else "eval_bytes" if dm.device_decode() else "eval")
    from lightning_methods.datamodules.streaming_litdata import ResumableStreamingDataLoader

    loader = ResumableStreamingDataLoader(dataset, batch_size=dm.batch_size if train else dm.eval_batch_size,
                                          num_workers=dm.num_workers, pin_memory=dm.pin_memory,
                                          collate_fn=collate_samples, drop_last=train)
    if train and hasattr(dm, "first_epoch"):
        # the fit's first epoch (a resume from an end-of-epoch checkpoint gets no loader state from Lightning):
        # litdata counts epochs from 1 and adds one when an epoch starts; a restored mid-epoch state overrides it
        loader.current_epoch = dm.first_epoch()
    return loader
