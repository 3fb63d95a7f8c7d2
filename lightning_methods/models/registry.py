"""The backbone registry: ``register_backbone`` at each backbone's definition site, ``create_backbone`` by name."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

BackboneFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str, factory: BackboneFactory) -> None:
    """Add ``factory(num_classes=..., **kwargs) -> nn.Module`` under ``name`` (case-insensitive)."""
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[key] = factory


def available_backbones() -> list[str]:
    """Names ``create_backbone`` builds itself (timm names work too, with a warning)."""
    return sorted(_REGISTRY)


def create_backbone(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a backbone by name.

    Args:
        name: a registered name (see ``available_backbones()``), else a timm model name.
        num_classes: size of the classification layer.
        **kwargs: passed to the backbone constructor (e.g. ``drop_rate`` for WideResNets).

    Raises:
        ValueError: if neither this registry nor timm knows ``name``; the message lists the known names.
    """
    factory = _REGISTRY.get(name.lower())
    if factory is not None:
        return factory(num_classes=num_classes, **kwargs)
    import timm

    if timm.is_model(name):
        warnings.warn(
            f"backbone {name!r} is not a CIFAR backbone of lightning-methods; creating it with timm. timm models have "
            "ImageNet stems (stride-4 stem with max-pool) that lose accuracy on 32x32 inputs "
            "(e.g. ResNet-34 59.8% vs 75.9% on CIFAR-100, timm #2481). "
            f"CIFAR backbones: {', '.join(available_backbones())}",
            stacklevel=2,
        )
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    raise ValueError(
        f"unknown backbone {name!r}: it is neither a lightning-methods CIFAR backbone nor a timm model. "
        f"Known CIFAR backbones: {', '.join(available_backbones())} (or any name in timm.list_models())."
    )
