"""The embedding stage of EncMin2L (arXiv 2605.20502): a frozen encoder runs once over an image set in the Trainer's
``predict`` loop (eval mode, no augmentation, the Trainer's precision, e.g. bf16 on GPUs) on one or many devices.

Each rank embeds its shard (a padding ``DistributedSampler``, :func:`lightning_methods.utils.sharded_loader`); at the
end of the epoch :class:`lightning_methods.callbacks.GatherPredictions` gathers the per-sample results and keeps one
row per sample index, so every rank holds exactly one row per sample, sorted by index.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_methods.callbacks.gather_predictions import GatherPredictions
from lightning_methods.datamodules.base import IndexedTensorDataset, collate_dict
from lightning_methods.ood.encoders import Encoder
from lightning_methods.ood.features import EmbeddingSet
from lightning_methods.utils import sharded_loader


class ImageSetDataModule(LightningDataModule):
    """uint8 images to embed, as sharded predict batches ``{"image", "target", "index"}``.

    Args:
        images: uint8 (N, 3, H, W).
        targets: int64 (N,).
        index: int64 sample ids (N,).
        batch_size: images per batch and device.
        num_workers: DataLoader workers.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, batch_size: int = 256,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.dataset = IndexedTensorDataset(images, targets, index)
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        return sharded_loader(self.dataset, self.batch_size, self.num_workers, collate_fn=collate_dict)


class EncoderModule(LightningModule):
    """Runs a frozen :class:`~lightning_methods.ood.encoders.Encoder` in ``predict``: per-sample
    ``{"index", "target", "features", ["logits"]}`` (float32).

    Args:
        encoder: the frozen encoder with its preprocessing.
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def on_predict_epoch_start(self) -> None:
        self.encoder.eval()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, torch.Tensor]:
        features, logits = self.encoder(batch["image"])
        out = {"index": batch["index"], "target": batch["target"], "features": features.float()}
        if logits is not None:
            out["logits"] = logits.float()
        return out


def embed(encoder: Encoder, images: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, *,
          make_trainer: Callable[..., Trainer], batch_size: int = 256, num_workers: int = 0) -> EmbeddingSet:
    """Embed one image set with ``encoder`` through ``make_trainer(callbacks=[...]).predict``.

    Args:
        encoder: the frozen encoder.
        images: uint8 images (N, 3, H, W).
        targets: int64 labels (N,).
        index: int64 sample ids (N,), unique.
        make_trainer: builds the stage Trainer (accelerator, devices, strategy, precision) with the given extra
            keyword arguments (a ``callbacks`` list).
        batch_size: images per batch and device.
        num_workers: DataLoader workers.

    Raises:
        ValueError: duplicate sample ids.
    """
    if len(torch.unique(index)) != len(index):
        raise ValueError("sample ids (index) of an image set must be unique")
    gather = GatherPredictions()
    trainer = make_trainer(callbacks=[gather])
    dm = ImageSetDataModule(images, targets, index, batch_size=batch_size, num_workers=num_workers)
    trainer.predict(EncoderModule(encoder), datamodule=dm, return_predictions=False)
    out = gather.results[0]
    return EmbeddingSet(out["features"], out["index"].long(), out["target"].long(), out.get("logits"))
