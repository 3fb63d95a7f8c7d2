"""Locality of one trained checkpoint: rebuild its ViT, probe a fixed set of clean test images, measure accuracy.

Used by ``lightning-methods locality`` (:mod:`lightning_methods.vit_locality.cli`). Checkpoints are the Lightning
checkpoints written by ``lightning-methods fit`` with an ``ImageClassifier``-based module (``ViTLocalityClassifier``):
the backbone is rebuilt from the stored hyperparameters (``backbone``, ``num_classes``, ``backbone_kwargs``) and loaded
strictly from the ``backbone.*`` weights; files are read with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_methods.analysis.attention import attention_locality, probe_indices
from lightning_methods.analysis.attention_extract import attention_modules
from lightning_methods.models import create_backbone
from lightning_methods.utils import safe_torch_load
from lightning_methods.vit_locality.module import protocol_components, protocol_name

#: DataModule classes by dataset name, and the dataset guessed from the number of classes.
DATASETS = {"cifar10": "CIFAR10DataModule", "cifar100": "CIFAR100DataModule",
            "tinyimagenet": "TinyImageNetDataModule", "digits": "DigitsDataModule"}
BY_CLASSES = {10: "cifar10", 100: "cifar100", 200: "tinyimagenet"}


def load_checkpoint_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's backbone (eval mode, CPU) and a description: hyperparameters, DataModule hyperparameters,
    protocol components and condition name.

    Raises:
        FileNotFoundError / ValueError: missing or unreadable file; a checkpoint without hyperparameters or with a
            backbone given as a module (not by name); weights that do not fit (missing / unexpected / mis-shaped keys).
    """
    ckpt = safe_torch_load(path, what="checkpoint")
    hp = dict(ckpt.get("hyper_parameters") or {})
    if not isinstance(hp.get("backbone"), str) or "num_classes" not in hp:
        raise ValueError(f"{path}: not a lightning-methods classifier checkpoint naming its backbone (hyper_parameters "
                         "need 'backbone' as a name and 'num_classes'); train with a backbone name, e.g. "
                         "model.init_args.backbone: vit_lite_7_4")
    model = create_backbone(hp["backbone"], int(hp["num_classes"]), **(hp.get("backbone_kwargs") or {}))
    state = {k[len("backbone."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("backbone.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: the backbone weights do not fit {hp['backbone']} "
                         f"(backbone_kwargs {hp.get('backbone_kwargs')}): missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, mis-shaped {shapes[:5]}")
    model.load_state_dict(state)
    data_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    components = protocol_components(hp, data_hp)
    info = {"hparams": hp, "data_hparams": data_hp, "components": components,
            "condition": protocol_name(**components), "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step")}
    return model.eval(), info


def evaluation_set(dataset: str, data_dir: str | Path, download: bool = False) -> dict[str, Any]:
    """The clean test split of ``dataset`` as uint8 images, labels and the normalisation statistics."""
    from lightning_methods import datamodules

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    cls = getattr(datamodules, DATASETS[dataset])
    dm = cls() if dataset == "digits" else cls(data_dir=str(data_dir), download=download, num_workers=0)
    if dataset != "digits":
        dm.prepare_data()
    dm.setup("test")
    return {"images": dm.test_set.images, "targets": dm.test_set.targets, "mean": tuple(dm.mean),
            "std": tuple(dm.std)}


@torch.no_grad()
def top1_accuracy(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, mean: tuple, std: tuple,
                  batch_size: int = 500, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy (%) of ``model`` on uint8 ``images`` (normalized, no augmentation)."""
    from lightning_methods.datamodules.transforms import normalize

    correct = 0
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        correct += int((model(x).argmax(-1).cpu() == targets[start : start + batch_size]).sum())
    return 100.0 * correct / len(images)


def checkpoint_record(path: str | Path, evalset: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]],
                      num_images: int = 1000, seed: int = 0, batch_size: int = 100, include_cls: bool = False,
                      renormalize: bool = True, accuracy: bool = True, device: str = "cpu",
                      condition: str | None = None) -> dict[str, Any]:
    """Everything the locality table needs from one checkpoint (JSON-ready): condition, per-head MAD (patch units)
    and entropy averaged over the probe set, grid, patch size and test accuracy.

    Args:
        path: the Lightning checkpoint.
        evalset: the output of :func:`evaluation_set`, or a function of the checkpoint description returning it.
        num_images, seed: size and seed of the probe set (a seeded subset of the test split).
        batch_size: probe batch size.
        include_cls, renormalize: attention-row settings (see ``analysis.attention.patch_attention``).
        accuracy: also measure top-1 accuracy on the whole test split.
        device: where to run the model.
        condition: a label overriding the condition read from the hyperparameters.
    """
    model, info = load_checkpoint_backbone(path)
    try:  # the model first: a CNN fails here, before the dataset and the probe-set size are looked at
        attention_modules(model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    model.to(device)
    if callable(evalset):
        evalset = evalset(info)
    idx = probe_indices(len(evalset["images"]), num_images, seed)
    from lightning_methods.datamodules.transforms import normalize

    x = normalize(evalset["images"][idx], evalset["mean"], evalset["std"])
    res = attention_locality(model, x, batch_size, include_cls, renormalize)
    acc = top1_accuracy(model, evalset["images"], evalset["targets"], evalset["mean"], evalset["std"],
                        device=device) if accuracy else None
    return {"checkpoint": str(path), "condition": condition or info["condition"], "components": info["components"],
            "backbone": info["hparams"]["backbone"], "num_classes": int(info["hparams"]["num_classes"]),
            "grid": list(res["grid"]), "patch_size": list(res["patch_size"]), "num_images": num_images,
            "probe_seed": seed, "include_cls": include_cls, "renormalize": renormalize,
            "mad_patch": res["mad"].mean(0).tolist(), "entropy": res["entropy"].mean(0).tolist(),
            "test_acc": acc, "epoch": info["epoch"], "global_step": info["global_step"]}
