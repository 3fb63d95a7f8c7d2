"""Config sections of the EncMin2L pipeline (``lightning-methods-ood``); every default that the paper does not fix is
marked "our choice" in docs/methods/ood.md. Data sources are LightningCLI-style dicts ``{"class_path", "init_args"}``
of image DataModules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_methods.ood.diagnostics import Selection
from lightning_methods.ood.features import Variant
from lightning_methods.ood.metrics import Convention
from lightning_methods.ood.pvalues import Recalibration


@dataclass
class IDConfig:
    """The in-distribution data.

    Attributes:
        name: short name of the ID set (tables, cache).
        data: the image DataModule (``class_path`` / ``init_args``).
        fit_split: split the RDMs (and baselines) are fitted on; ``calib_fractions`` of it are held out.
        test_split: the ID test split of the metrics.
        calib_fractions: fractions of ``fit_split`` held out as ``calib_1`` and ``calib_2`` (seeded, disjoint from
            the RDM training split; our choice 0.1 each). Ignored when ``calib_split`` is set.
        calib_split: another split (e.g. ``"val"``) to draw ``calib_1`` / ``calib_2`` from (halves), instead.
        max_fit_samples: subsample the RDM training split (``None``: all).
        max_test_samples: subsample the ID test split (``None``: all).
        classes: keep only these classes as ID (relabelled ``0..len(classes)-1`` in their order); ``None``: all.
    """

    name: str = "id"
    data: dict[str, Any] = field(default_factory=dict)
    fit_split: str = "train"
    test_split: str = "test"
    calib_fractions: list[float] = field(default_factory=lambda: [0.1, 0.1])
    calib_split: str | None = None
    max_fit_samples: int | None = None
    max_test_samples: int | None = None
    classes: list[int] | None = None


@dataclass
class OODSetConfig:
    """One OOD evaluation set.

    Attributes:
        name: short name (tables, cache).
        group: ``"near"``, ``"far"``, ``"covariate"``, ... (means per group are reported).
        data: the image DataModule (``class_path`` / ``init_args``); ``None`` reuses the ID DataModule.
        split: which split of it.
        classes: keep only these labels (e.g. the held-out digit classes).
        exclude_classes: drop these labels.
        corruption: a CIFAR-C-style corruption applied on the fly (synthetic covariate shift).
        severity: corruption severity (1..5).
        corruption_seed: seed of the corruption draws.
        max_samples: subsample (seeded) to at most this many images.
    """

    name: str
    group: str = "far"
    data: dict[str, Any] | None = None
    split: str = "test"
    classes: list[int] | None = None
    exclude_classes: list[int] | None = None
    corruption: str | None = None
    severity: int = 3
    corruption_seed: int = 0
    max_samples: int | None = None


@dataclass
class RDMConfig:
    """Training and scoring of the per-encoder RDMs (defaults: the RDM code, arXiv 2504.07793).

    Attributes:
        module: ``RDMModule`` arguments besides ``dim`` (SDE, network size, optimizer, ODE solver, ...).
        batch_size: training batch size (4096).
        max_epochs: training epochs (200).
        ema_decay: EMA decay with warm-up (0.9999); ``None`` disables the EMA.
        gradient_clip_val: gradient-norm clipping (1).
        conditional: class-conditional RDM with the classifier's predicted class as context (needs logits).
        score_batch_size: samples per PF-ODE solve (and device).
    """

    module: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4096
    max_epochs: int = 200
    ema_decay: float | None = 0.9999
    gradient_clip_val: float = 1.0
    conditional: bool = False
    score_batch_size: int = 1024


@dataclass
class FusionConfig:
    """Calibration, the two-level min gate and the metric conventions.

    Attributes:
        recalibration: ``"ecdf"`` (default), ``"tippett"``, ``"sidak"``, ``"bonferroni"`` or ``"none"``.
        fpr_convention: FPR@95 convention, ``"v1.5"`` (ID positive) or ``"head"`` (OpenOOD after 2023-08).
    """

    recalibration: Recalibration = "ecdf"
    fpr_convention: Convention = "v1.5"


@dataclass
class DiagnosticsConfig:
    """eta^2 / Delta-mu diagnostics and the encoder subset they choose (our choice throughout).

    Attributes:
        corruptions: synthetic corruptions of the ID test split for Delta-mu.
        severity: their severity.
        standardize: divide Delta-mu by the ID score std.
        eta2_on: ANOVA of the RDM log-likelihoods (``"scores"``) or of the encoder features (``"features"``).
        selection: ``"top1_union"``, ``"topk_union"`` or ``"all"``.
        k: encoders per criterion for ``"topk_union"``.
    """

    corruptions: list[str] = field(default_factory=lambda: ["gaussian_noise", "gaussian_blur", "jpeg_compression"])
    severity: int = 3
    standardize: bool = False
    eta2_on: Literal["scores", "features"] = "scores"
    selection: Selection = "top1_union"
    k: int = 1


@dataclass
class BaselineConfig:
    """Baselines on the same cached features.

    Attributes:
        msp: maximum softmax probability (encoders with logits).
        energy: energy score (encoders with logits).
        energy_temperature: its temperature.
        mahalanobis: class-conditional Gaussian with shared covariance.
        knn_k: k of the deep-nearest-neighbour score (0 disables).
        monolithic: one RDM on the concatenated embeddings of all encoders.
        monolithic_variant: normalisation of the concatenated features.
    """

    msp: bool = True
    energy: bool = True
    energy_temperature: float = 1.0
    mahalanobis: bool = True
    knn_k: int = 50
    monolithic: bool = True
    monolithic_variant: Variant = "standardize"


@dataclass
class EmbedConfig:
    """The embedding stage.

    Attributes:
        batch_size: images per batch and device.
        num_workers: DataLoader workers.
    """

    batch_size: int = 256
    num_workers: int = 0


#: The config sections of ``lightning-methods ood`` that hold one class's arguments (``parser.add_class_arguments``):
#: a setting a later version adds to one of them keeps a run resumable at its default (``runs.fingerprint_diff``).
SECTIONS = {"id": IDConfig, "rdm": RDMConfig, "fusion": FusionConfig, "diagnostics": DiagnosticsConfig,
            "baselines": BaselineConfig, "embed": EmbedConfig}
