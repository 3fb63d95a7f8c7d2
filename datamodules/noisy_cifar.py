"""CIFAR-10 / CIFAR-100 with synthetic or real (CIFAR-N) label noise, for learning with noisy labels.

Setup of Yuan et al., "Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy Examples" (Early
Cutting, arXiv 2502.08227): noise is generated once on the 50k training images with the official generator, then
10% of the (noisy) training set is held out for validation (45k / 5k), the test set is clean. Training batches carry
``"index"`` (base index), ``"target"`` (noisy) and ``"clean_target"`` (true label, analysis only).

Noise types (``noise_type``):

- ``sym``: uniform flips to a *different* class with probability ``noise_rate`` (``include_noise=True``: the rate
  counts flips to any class, i.e. is multiplied by ``1 - 1/C``);
- ``pairflip``: ``i -> (i + 1) mod C``;
- ``asym``: CIFAR-100: cyclic flips inside groups of 5 classes, ``asym_grouping="consecutive5"`` (classes 0-4, 5-9,
  ...: the common ELR-style convention, default) or ``"superclass"`` (the 20 real superclasses, read from the
  ``coarse_labels`` of the release); CIFAR-10: the standard class map (truck->automobile, bird->airplane,
  cat<->dog, deer->horse), ``asym_grouping="classmap"``. ``"cyclic"`` gives ``i -> i + 1`` over all classes, which is
  what the official ``main.py`` actually runs for ``asym`` (it does not pass the dataset name to the generator);
- ``instance``: instance-dependent PTD noise (Xia et al., NeurIPS 2020) from raw pixels;
- ``cifarn``: real human labels from a CIFAR-N file the user supplies (``cifarn_file``; key ``cifarn_key``, default
  ``noisy_label`` for CIFAR-100N and ``worse_label`` for CIFAR-10N);
- ``none``: clean labels (still with ``clean_target``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from lightning_methods.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule, read_cifar_batch
from lightning_methods.datamodules.label_noise import CIFAR10_ASYM_MAP, NoiseType, cifar100_groups
from lightning_methods.datamodules.noisy_base import NoisyLabelsMixin

AsymGrouping = Literal["consecutive5", "superclass", "classmap", "cyclic"]

_NOISE_ARGS_DOC = """
    Args:
        noise_type: ``none``, ``sym``, ``pairflip``, ``asym``, ``instance`` or ``cifarn`` (see the module docstring).
        noise_rate: nominal flip probability ``r`` (ignored for ``cifarn`` and ``none``).
        noise_seed: seed of the noise generator (default: ``seed``, as in the official code).
        include_noise: symmetric noise only: rescale the rate by ``1 - 1/C``.
        asym_grouping: asymmetric noise pattern (default: ``consecutive5`` for CIFAR-100, ``classmap`` for CIFAR-10).
        cifarn_file: path of ``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt`` for ``noise_type="cifarn"``.
        cifarn_key: label set inside that file (``noisy_label``; CIFAR-10N: ``worse_label``, ``aggre_label``,
            ``random_label1``..``3``).
        label_file: where to save the generated labels (reloaded and checked when it exists); ``None``: not saved.
        train_subset: train only on these base indices (a list, or a .npy / .pt / .json / text file of indices).
        batch_size: training batch size (paper: 32, RandomCrop(32, 4) + flip).
        eval_batch_size: evaluation batch size (512).
        val_split: fraction of the noisy training set held out as noisy validation data (paper: 0.1).
        seed: seed of the hold-out split (and, by default, of the noise).
        **kwargs: every other argument of :class:`CIFARDataModule` / :class:`ImageDataModule` (``data_dir``,
            ``download``, ``num_workers``, ``augment``, ``gpu_resident``, ``cutmix_alpha``, ``mixup_alpha``,
            ``pin_memory``), by keyword.
"""


class _NoisyCIFAR(NoisyLabelsMixin):
    """The constructor shared by the noisy CIFAR DataModules (combined with a CIFAR DataModule; see the module
    docstring). ``asym_groupings`` lists the valid ``asym_grouping`` values, the first being the default."""

    asym_groupings: tuple[str, ...] = ()
    display_name: str

    def __init__(
        self,
        noise_type: NoiseType = "sym",
        noise_rate: float = 0.4,
        noise_seed: int | None = None,
        include_noise: bool = False,
        asym_grouping: AsymGrouping | None = None,
        cifarn_file: str | None = None,
        cifarn_key: str | None = None,
        label_file: str | None = None,
        train_subset: list[int] | str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = 512,
        val_split: float = 0.1,
        seed: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, val_split=val_split, seed=seed,
                         **kwargs)
        if asym_grouping not in (None, *self.asym_groupings):
            raise ValueError(f"{self.display_name} asym_grouping must be one of {self.asym_groupings}, got "
                             f"{asym_grouping!r}")
        self._init_noise(noise_type=noise_type, noise_rate=noise_rate, noise_seed=noise_seed,
                         include_noise=include_noise,
                         asym_grouping=asym_grouping or self.asym_groupings[0], cifarn_file=cifarn_file,
                         cifarn_key=cifarn_key, label_file=label_file, train_subset=train_subset)


class NoisyCIFAR100DataModule(_NoisyCIFAR, CIFAR100DataModule):
    __doc__ = "CIFAR-100 with label noise (50k -> 45k noisy train / 5k noisy val / 10k clean test).\n" + _NOISE_ARGS_DOC

    mean = (0.507, 0.487, 0.441)  # the normalization of the official Early Cutting code
    std = (0.267, 0.256, 0.276)
    asym_groupings = ("consecutive5", "superclass", "cyclic")

    def coarse_labels(self) -> np.ndarray:
        """Per-sample superclass labels of the training split (``coarse_labels`` in the release pickle)."""
        try:
            return read_cifar_batch(self.release_dir / self.train_files[0], "coarse_labels")[1]
        except KeyError as err:
            raise ValueError(f"{self.release_dir / 'train'} has no 'coarse_labels'; use asym_grouping "
                             "'consecutive5' or a complete CIFAR-100 release") from err

    def asym_spec(self, clean: np.ndarray) -> dict[str, Any]:
        if self.asym_grouping == "cyclic":
            return {}
        if self.asym_grouping == "superclass":
            return {"asym_groups": cifar100_groups("superclass", self.coarse_labels(), clean)}
        return {"asym_groups": cifar100_groups("consecutive5")}


class NoisyCIFAR10DataModule(_NoisyCIFAR, CIFAR10DataModule):
    __doc__ = "CIFAR-10 with label noise (50k -> 45k noisy train / 5k noisy val / 10k clean test).\n" + _NOISE_ARGS_DOC

    mean = (0.4914, 0.4822, 0.4465)  # the normalization of the official Early Cutting code
    std = (0.2023, 0.1994, 0.2010)
    asym_groupings = ("classmap", "cyclic")

    def default_cifarn_key(self) -> str:
        return "worse_label"

    def asym_spec(self, clean: np.ndarray) -> dict[str, Any]:
        return {} if self.asym_grouping == "cyclic" else {"asym_map": dict(CIFAR10_ASYM_MAP)}
