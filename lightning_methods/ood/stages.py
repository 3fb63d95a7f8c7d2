"""Stage functions of the EncMin2L pipeline (arXiv 2605.20502), each one Trainer call: training a package encoder on
the RDM training split (optional), fitting an RDM on cached features (resumable from ``last.ckpt``), scoring feature
sets by PF-ODE likelihood in the predict loop (gathered by index across ranks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_methods.callbacks.gather_predictions import GatherPredictions
from lightning_methods.callbacks.warmup_ema import WarmupEMA
from lightning_methods.checkpoint_io import SafeCheckpointIO, read_checkpoint
from lightning_methods.classifier import ImageClassifier
from lightning_methods.datamodules.base import ImageDataModule
from lightning_methods.ood.cache import load_verified
from lightning_methods.ood.config import RDMConfig
from lightning_methods.ood.features import EmbeddingDataModule, EmbeddingSet, FeaturePreprocessor
from lightning_methods.ood.progress import ProgressLines
from lightning_methods.ood.rdm import RDMModule
from lightning_methods.ood.rdm_settings import LikelihoodSettings, ScoreNetSettings, SDESettings, TrainingSettings

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


def train_encoder(backbone: str, images: torch.Tensor, targets: torch.Tensor, *, num_classes: int, mean: tuple,
                  std: tuple, settings: Mapping[str, Any], out_dir: Path, make_trainer: MakeTrainer,
                  seed: int = 0, progress: bool = True) -> Path | None:
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
        progress: epoch lines (:class:`~lightning_methods.ood.progress.ProgressLines`).
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
    dm = ArrayDataModule(images, targets, num_classes, mean=mean, std=std,
                         batch_size=int(settings.get("batch_size", 128)), num_workers=0,
                         augment=settings.get("augment", "crop"), seed=seed)
    last = out_dir / "last.ckpt"
    ckpt = ModelCheckpoint(dirpath=out_dir, filename="last", save_last=False, save_top_k=1, every_n_epochs=1,
                           enable_version_counter=False)
    callbacks = [ckpt, *([ProgressLines(f"encoder {backbone}")] if progress else [])]
    trainer = make_trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True, limit_val_batches=0,
                           num_sanity_val_steps=0, plugins=[SafeCheckpointIO()])
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if last.is_file() else None)
    return last if _complete(trainer) else None


#: the settings group of each RDMModule field (to name the right place for a flat ``rdm.module`` key)
_GROUPS = {f.name: group for group, cls in (("sde", SDESettings), ("net", ScoreNetSettings),
                                            ("training", TrainingSettings), ("likelihood", LikelihoodSettings))
           for f in fields(cls)}


def build_rdm(cfg: RDMConfig, dim: int, num_classes: int | None) -> RDMModule:
    """An RDMModule of the config (``num_classes`` only for the conditional variant).

    Raises:
        ValueError: ``rdm.module`` has a key that is not an RDMModule argument (a flat setting names its group).
    """
    allowed = {"optimizer", "sde", "net", "training", "likelihood"}
    for key in cfg.module:
        if key not in allowed:
            where = f"rdm.module.{_GROUPS[key]}.{key}" if key in _GROUPS else f"one of {sorted(allowed)}"
            raise ValueError(f"rdm.module.{key} is not an RDMModule argument; use {where} (RDMModule groups its "
                             "settings: sde, net, training, likelihood, and takes an optimizer)")
    module = dict(cfg.module)
    optimizer = module.get("optimizer")
    if isinstance(optimizer, Mapping) and "class_path" in optimizer:  # jsonargparse fills in every default,
        init_args = {k: v for k, v in (optimizer.get("init_args") or {}).items() if k != "params"}  # params too
        module["optimizer"] = {"class_path": optimizer["class_path"], "init_args": init_args}
    return RDMModule(dim=dim, num_classes=num_classes if cfg.conditional else None, **module)


def fit_rdm(cfg: RDMConfig, train: EmbeddingSet, preprocessor: FeaturePreprocessor, *, num_classes: int | None,
            out_dir: Path, make_trainer: MakeTrainer, seed: int = 0, progress: str | None = None) -> RDMModule | None:
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
        progress: stage name of the epoch lines (``None``: none).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_rdm(cfg, preprocessor.out_dim, num_classes)
    last = out_dir / "last.ckpt"
    if last.is_file():
        checkpoint = read_checkpoint(last)  # checksum verified
        if int(checkpoint.get("epoch", -1)) + 1 >= cfg.max_epochs:
            # a finished fit (its rdm.pt was lost): the checkpoint's state_dict holds the final (EMA) weights;
            # Trainer.fit would skip the finished loop without swapping the EMA weights in
            model.load_state_dict(checkpoint["state_dict"])
            return model
    dm = EmbeddingDataModule.from_sets(train, preprocessor=preprocessor, conditional=cfg.conditional,
                                       batch_size=min(cfg.batch_size, len(train.index)), seed=seed)
    callbacks: list[Any] = [ModelCheckpoint(dirpath=out_dir, filename="last", save_top_k=1, every_n_epochs=1,
                                            enable_version_counter=False)]
    if cfg.ema_decay is not None:
        callbacks.insert(0, WarmupEMA(cfg.ema_decay))
    if progress:
        callbacks.append(ProgressLines(progress))
    trainer = make_trainer(max_epochs=cfg.max_epochs, gradient_clip_val=cfg.gradient_clip_val, callbacks=callbacks,
                           enable_checkpointing=True, limit_val_batches=0, num_sanity_val_steps=0,
                           plugins=[SafeCheckpointIO()])
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if last.is_file() else None)
    return model if _complete(trainer) else None


def rdm_package(model: RDMModule, preprocessor: FeaturePreprocessor) -> dict[str, Any]:
    """The saved form of a fitted RDM: hyperparameters, (EMA) weights, preprocessing, parameter count."""
    return {"hparams": dict(model.hparams), "state_dict": model.state_dict(),
            "preprocessor": preprocessor.state_dict(), "num_parameters": model.net.num_parameters()}


def load_rdm(path: Path) -> tuple[RDMModule, FeaturePreprocessor]:
    """Load :func:`rdm_package` output written by :func:`~lightning_methods.ood.cache.save_verified` (checksum
    verified, ``weights_only``).

    Raises:
        CorruptFileError: the file differs from its recorded checksum.
    """
    package = load_verified(path, "fitted RDM")
    model = RDMModule(**package["hparams"])
    model.load_state_dict(package["state_dict"])
    return model.eval(), FeaturePreprocessor.from_state_dict(package["preprocessor"])


def score_sets(model: RDMModule, preprocessor: FeaturePreprocessor, sets: Mapping[str, EmbeddingSet], *,
               make_trainer: MakeTrainer, batch_size: int, conditional: bool = False,
               progress: str | None = None) -> dict[str, dict]:
    """PF-ODE log-likelihoods of every feature set through one predict loop: ``{name: {"index", "logp"}}``
    (``progress``: stage name of the batch lines, ``None`` for none)."""
    names = list(sets)
    first = sets[names[0]]
    dm = EmbeddingDataModule.from_sets(first, dict(sets), preprocessor=preprocessor, conditional=conditional,
                                       eval_batch_size=batch_size)
    gather = GatherPredictions(keys=["logp"])
    trainer = make_trainer(callbacks=[gather, *([ProgressLines(progress, names)] if progress else [])])
    trainer.predict(model.eval(), datamodule=dm, return_predictions=False)
    return {name: gather.results[i] for i, name in enumerate(names)}
