"""Settings of the attention-locality probe (which images, how attention rows are read, the token geometry), grouped
so that ``AttentionLocality(settings=LocalitySettings(...))`` and LightningCLI (``settings:`` in YAML) fill them the
same way. The measures themselves are ``lightning_methods.analysis.attention``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_methods.analysis.attention_extract import Method


@dataclass
class LocalitySettings:
    """What the locality probe measures (every value is written into each probe's ``summary.json``).

    Args:
        num_images: size of the probe set, a seeded choice of images of ``split`` (error if larger than the split).
        seed: seed of the probe-set choice.
        batch_size: probe batch size (the numbers do not depend on it).
        split: DataModule split to probe: ``"test"`` (default) or ``"val"``.
        include_cls: keep the CLS key in the attention rows (default False: drop it).
        renormalize: renormalize the rows over the patch keys after dropping CLS (default True).
        method: attention extraction (``"auto"``, ``"recompute"``, ``"explicit"``; see analysis.attention_extract).
        max_early_layer: last layer of the "early" summaries (layers 0..2 by default).
        grid_size, num_prefix_tokens, patch_size: token geometry for models where timm's attributes are missing.

    Raises:
        ValueError: a non-positive ``num_images`` / ``batch_size``, an unknown split, or ``max_early_layer < 0``.
    """

    num_images: int = 1000
    seed: int = 0
    batch_size: int = 100
    split: Literal["test", "val"] = "test"
    include_cls: bool = False
    renormalize: bool = True
    method: Method = "auto"
    max_early_layer: int = 2
    grid_size: int | None = None
    num_prefix_tokens: int | None = None
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_images < 1:
            raise ValueError(f"batch_size and num_images must be positive, got batch_size={self.batch_size}, "
                             f"num_images={self.num_images}")
        if self.split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {self.split!r}")
        if self.max_early_layer < 0:
            raise ValueError(f"max_early_layer must be >= 0, got {self.max_early_layer}")

    @property
    def geometry(self) -> dict[str, int | None]:
        """The token-geometry overrides, as ``attention_locality`` takes them."""
        return {"grid_size": self.grid_size, "num_prefix_tokens": self.num_prefix_tokens, "patch_size": self.patch_size}
