"""Stage functions of the EncMin2L pipeline (arXiv 2605.20502), each one Trainer call: training a package encoder on
the RDM training split (optional), fitting an RDM on cached features (resumable from ``last.ckpt``), scoring feature
sets by PF-ODE likelihood in the predict loop (gathered by index across ranks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ..callbacks.gather_predictions import GatherPredictions
from ..callbacks.warmup_ema import WarmupEMA
from ..classifier import ImageClassifier
from ..datamodules.base import ImageDataModule
from ..utils import safe_torch_load
from .config import RDMConfig
from .features import EmbeddingDataModule, FeaturePreprocessor, FeatureSet
from .rdm import RDMModule

MakeTrainer = Callable[..., Trainer]


class ArrayDataModule(ImageDataModule):
    """In-memory uint8 images as a training DataModule (the test split is the training split).

    Args:
        images: uint8 (N, 3, H, W).
        targets: int64 (N,).
        num_classes: number of classes.
        mean: normalisation mean.
        std: normalisation std.
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, num_classes: int, mean: tuple, std: tuple,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arrays, self.num_classes, self.mean, self.std = (images, targets), num_classes, mean, std

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"train": self.arrays, "test": self.arrays}


def _complete(trainer: Trainer) -> bool:
    return not trainer.interrupted and trainer.current_epoch >= (trainer.max_epochs or 0)


def train_encoder(backbone: str, images: torch.Tensor, targets: torch.Tensor, num_classes: int, mean: tuple,
                  std: tuple, settings: Mapping[str, Any], out_dir: Path, make_trainer: MakeTrainer,
                  seed: int = 0) -> Path | None:
    """Train a package backbone as an ImageClassifier (SGD, cosine schedule) on the given images; returns the final
    checkpoint, or ``None`` when training was interrupted (rerun to resume from ``last.ckpt``).

    Args:
        backbone: package backbone name.
        images: the RDM training split's images (never calibration or test data).
        targets: their labels.
        num_classes: ID classes.
        mean: normalisation mean of the ID data.
        std: normalisation std.
        settings: ``max_epochs`` (10), ``lr`` (0.05), ``batch_size`` (128), ``weight_decay`` (5e-4),
            ``augment`` (``"crop"``).
        out_dir: directory of the checkpoints.
        make_trainer: stage Trainer factory.
        seed: initialisation seed.
    """
    from functools import partial

    epochs = int(settings.get("max_epochs", 10))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageClassifier(
            backbone=backbone, num_classes=num_classes,
            optimizer=partial(torch.optim.SGD, lr=float(settings.get("lr", 0.05)), momentum=0.9,
                              weight_decay=float(settings.get("weight_decay", 5e-4))),
            lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs))
    dm = ArrayDataModule(images, targets, num_classes, mean, std, batch_size=int(settings.get("batch_size", 128)),
                         num_workers=0, augment=settings.get("augment", "crop"), seed=seed)
    last = out_dir / "last.ckpt"
    ckpt = ModelCheckpoint(dirpath=out_dir, filename="last", save_last=False, save_top_k=1, every_n_epochs=1,
                           enable_version_counter=False)
    trainer = make_trainer(max_epochs=epochs, callbacks=[ckpt], enable_checkpointing=True, limit_val_batches=0,
                           num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if last.is_file() else None)
    return last if _complete(trainer) else None


def build_rdm(cfg: RDMConfig, dim: int, num_classes: int | None) -> RDMModule:
    """An RDMModule of the config (``num_classes`` only for the conditional variant)."""
    return RDMModule(dim=dim, num_classes=num_classes if cfg.conditional else None, **cfg.module)


def fit_rdm(cfg: RDMConfig, train: FeatureSet, preprocessor: FeaturePreprocessor, num_classes: int | None,
            out_dir: Path, make_trainer: MakeTrainer, seed: int = 0) -> RDMModule | None:
    """Fit one RDM on preprocessed ID-train features, resuming from ``out_dir/last.ckpt``; returns the module with
    its EMA weights, or ``None`` when training was interrupted.

    Args:
        cfg: the RDM section of the config.
        train: ID-train features (raw encoder features; ``preprocessor`` is already fitted on them).
        preprocessor: PCA + normalisation variant.
        num_classes: ID classes (conditional variant).
        out_dir: checkpoint directory of this RDM.
        make_trainer: stage Trainer factory (gets ``max_epochs``, ``gradient_clip_val``, the EMA and checkpoint
            callbacks).
        seed: initialisation seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_rdm(cfg, preprocessor.out_dim, num_classes)
    dm = EmbeddingDataModule.from_sets(train, preprocessor=preprocessor, conditional=cfg.conditional,
                                       batch_size=min(cfg.batch_size, len(train.index)), seed=seed)
    callbacks: list[Any] = [ModelCheckpoint(dirpath=out_dir, filename="last", save_top_k=1, every_n_epochs=1,
                                            enable_version_counter=False)]
    if cfg.ema_decay is not None:
        callbacks.insert(0, WarmupEMA(cfg.ema_decay))
    trainer = make_trainer(max_epochs=cfg.max_epochs, gradient_clip_val=cfg.gradient_clip_val, callbacks=callbacks,
                           enable_checkpointing=True, limit_val_batches=0, num_sanity_val_steps=0)
    last = out_dir / "last.ckpt"
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if last.is_file() else None)
    return model if _complete(trainer) else None


def rdm_package(model: RDMModule, preprocessor: FeaturePreprocessor) -> dict[str, Any]:
    """The saved form of a fitted RDM: hyperparameters, (EMA) weights, preprocessing, parameter count."""
    return {"hparams": dict(model.hparams), "state_dict": model.state_dict(),
            "preprocessor": preprocessor.state_dict(), "num_parameters": model.net.num_parameters()}


def load_rdm(path: Path) -> tuple[RDMModule, FeaturePreprocessor]:
    """Load :func:`rdm_package` output (``weights_only``)."""
    package = safe_torch_load(path, what="fitted RDM")
    model = RDMModule(**package["hparams"])
    model.load_state_dict(package["state_dict"])
    return model.eval(), FeaturePreprocessor.from_state_dict(package["preprocessor"])


def score_sets(model: RDMModule, preprocessor: FeaturePreprocessor, sets: Mapping[str, FeatureSet],
               make_trainer: MakeTrainer, batch_size: int, conditional: bool = False) -> dict[str, dict]:
    """PF-ODE log-likelihoods of every feature set through one predict loop: ``{name: {"index", "logp"}}``."""
    names = list(sets)
    first = sets[names[0]]
    dm = EmbeddingDataModule.from_sets(first, dict(sets), preprocessor=preprocessor, conditional=conditional,
                                       eval_batch_size=batch_size)
    gather = GatherPredictions(keys=["logp"])
    trainer = make_trainer(callbacks=[gather])
    trainer.predict(model.eval(), datamodule=dm, return_predictions=False)
    return {name: gather.results[i] for i, name in enumerate(names)}
