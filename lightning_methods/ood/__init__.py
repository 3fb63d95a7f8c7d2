"""EncMin2L: multi-encoder OOD detection with representation-space diffusion models, calibrated min gates and
OpenOOD metrics.

Paper: Bhuyan, "Tippett-minimum Fusion of Representation-space Diffusion Models for Multi-Encoder
Out-of-Distribution Detection" (arXiv 2605.20502). Per-encoder density model: the representation-space diffusion
model (RDM) of "Revisiting Likelihood-Based OOD Detection by Modeling Representations" (arXiv 2504.07793, official
code limchaos/Likelihood-OOD). Metric conventions: OpenOOD v1.5 (arXiv 2306.09301).

Public parts:

- density model: :class:`RDMModule` (LightningModule), :class:`ScoreMLP`, :func:`dsm_loss`, the SDEs
  (:class:`VPSDE`, :class:`SubVPSDE`, :class:`VESDE`, :func:`make_sde`), :func:`pf_ode_likelihood`;
- features: :class:`FeatureSet`, :class:`FeaturePreprocessor` (PCA, normalisation variants),
  :class:`EmbeddingDataModule`, :class:`EmbeddingCache`, :class:`EncoderSpec` / :func:`build_encoder`,
  :class:`EncoderModule` / :func:`embed`;
- calibration and fusion: :func:`ecdf_pvalues`, :func:`recalibrate`, :func:`tippett`, :class:`TwoLevelMinGate`;
- metrics and diagnostics: :func:`ood_metrics` (AUROC, FPR@95, AUPR-In/Out), :func:`group_means`, :func:`anova`,
  :func:`eta_squared`, :func:`delta_mu`, :func:`select_encoders`;
- baselines: :func:`msp`, :func:`energy`, :class:`Mahalanobis`, :class:`KNN`.

Family pieces elsewhere: callbacks :class:`lightning_methods.callbacks.WarmupEMA` and
:class:`lightning_methods.callbacks.GatherPredictions`; DataModules ``SVHNDataModule``, ``MNISTDataModule``,
``DTDDataModule``, ``Places365DataModule``, ``CelebADataModule``, ``CorruptedDataModule``, ``CIFARCDataModule``,
``SamplePatchesDataModule`` and the corruptions (``lightning_methods.datamodules``); configs ``configs/ood/``
(pipeline: ``cifar100_encmin2l.yaml``, ``digits_demo.yaml``; one RDM with ``lightning-methods fit``:
``rdm_features.yaml``); command ``lightning-methods-ood`` (:mod:`lightning_methods.ood.cli`, not imported here);
doc ``docs/methods/ood.md``; tests ``tests/ood/``; benchmark ``benchmarks/ood_cases.py``.
"""

from .baselines import KNN, Mahalanobis, energy, msp
from .cache import EmbeddingCache, StaleCacheError
from .diagnostics import anova, delta_mu, eta_squared, select_encoders
from .embedding import EncoderModule, embed
from .encoders import EncoderSpec, build_encoder
from .features import EmbeddingDataModule, FeaturePreprocessor, FeatureSet
from .likelihood import pf_ode_likelihood
from .metrics import group_means, ood_metrics
from .pvalues import TwoLevelMinGate, ecdf_pvalues, recalibrate, tippett
from .rdm import RDMModule, dsm_loss
from .score_net import ScoreMLP
from .sde import VESDE, VPSDE, SubVPSDE, make_sde

__all__ = [
    "KNN",
    "EmbeddingCache",
    "EmbeddingDataModule",
    "EncoderModule",
    "EncoderSpec",
    "FeaturePreprocessor",
    "FeatureSet",
    "Mahalanobis",
    "RDMModule",
    "ScoreMLP",
    "StaleCacheError",
    "SubVPSDE",
    "TwoLevelMinGate",
    "VESDE",
    "VPSDE",
    "anova",
    "build_encoder",
    "delta_mu",
    "dsm_loss",
    "ecdf_pvalues",
    "embed",
    "energy",
    "eta_squared",
    "group_means",
    "make_sde",
    "msp",
    "ood_metrics",
    "pf_ode_likelihood",
    "recalibrate",
    "select_encoders",
    "tippett",
]
