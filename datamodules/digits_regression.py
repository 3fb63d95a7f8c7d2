"""scikit-learn's bundled digits with a real-valued per-image target: an offline classification + regression task.

Backs the HPN multi-task demo (``configs/hpn/digits_multitask.yaml``): batches are
``{"image", "target", "index", "regression_target"}`` where ``"target"`` is the digit class and
``"regression_target"`` (float32) is one of these per-image quantities, computed on the original 8x8 image with
pixel values 0..16:

- ``"ink"`` (default): the total ink, ``sum of pixel values / 16``, i.e. the number of fully lit pixels the strokes
  amount to (about 12 to 45 on this dataset). It depends on the class (a "1" uses less ink than an "8") and on the
  writer, so classification and regression share information, as style and year do on OmniArt;
- ``"row_centroid"``: the row of the ink's centre of mass (0 = top row, 7 = bottom), in pixels.

``regression_bounds()`` returns the training split's (min, max), the bounds ``HPNRegressor`` / ``HPNMultiTask`` map
to the two poles.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_methods.datamodules.digits import DigitsDataModule, load_digits_uint8

Quantity = Literal["ink", "row_centroid"]


def digit_regression_values(quantity: Quantity = "ink") -> torch.Tensor:
    """The per-image quantity for all 1797 digits (float32, dataset order; see the module docstring)."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).double()  # (N, 8, 8), values 0..16
    if quantity == "ink":
        return (images.sum(dim=(1, 2)) / 16.0).float()
    if quantity == "row_centroid":
        rows = torch.arange(8, dtype=torch.float64).view(1, 8, 1)
        return ((images * rows).sum(dim=(1, 2)) / images.sum(dim=(1, 2))).float()
    raise ValueError(f"quantity must be 'ink' or 'row_centroid', got {quantity!r}")


class DigitsRegressionDataModule(DigitsDataModule):
    """:class:`DigitsDataModule` whose batches also carry ``"regression_target"`` (see the module docstring).

    Args:
        quantity: ``"ink"`` or ``"row_centroid"``.
        image_size: side of the (bilinearly resized) square images: 32 (CIFAR-shaped, default) or e.g. 8 (the
            originals; 16x fewer pixels, for fast CPU demos).
        **kwargs: every argument of :class:`DigitsDataModule` (``val_fraction``, ``test_fraction``, ``batch_size``,
            ``augment`` ("none" by default: a crop moves ink off the image), ``seed``, ...), by keyword.
    """

    def __init__(self, quantity: Quantity = "ink", image_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if quantity not in ("ink", "row_centroid"):
            raise ValueError(f"quantity must be 'ink' or 'row_centroid', got {quantity!r}")
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        self.quantity, self.image_size = quantity, image_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        values = digit_regression_values(self.quantity)
        images = load_digits_uint8(self.image_size)[0] if self.image_size != 32 else None
        for ds in {id(d): d for d in (self.train_set, self.val_set, self.test_set)}.values():
            ds.extras["regression_target"] = values[ds.indices]
            if images is not None:
                ds.images = images[ds.indices]
        if images is not None:
            train = self.train_set.images.float() / 255
            self.mean = tuple(train.mean(dim=(0, 2, 3)).tolist())
            self.std = tuple(train.std(dim=(0, 2, 3)).tolist())

    def regression_bounds(self) -> tuple[float, float]:
        """(min, max) of the regression target over the training split."""
        if self.train_set is None:
            self.setup("fit")
        values = self.train_set.extras["regression_target"]
        return float(values.min()), float(values.max())
