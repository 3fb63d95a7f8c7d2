"""EncMin2L: multi-encoder OOD detection with representation-space diffusion models, calibrated min gates and
OpenOOD metrics.

Paper: Bhuyan, "Tippett-minimum Fusion of Representation-space Diffusion Models for Multi-Encoder
Out-of-Distribution Detection" (arXiv 2605.20502). Per-encoder density model: the representation-space diffusion
model (RDM) of "Revisiting Likelihood-Based OOD Detection by Modeling Representations" (arXiv 2504.07793, official
code limchaos/Likelihood-OOD). Metric conventions: OpenOOD v1.5 (arXiv 2306.09301).

Public parts:

- density model: :class:`RDMModule` (LightningModule; settings :class:`SDESettings`, :class:`ScoreNetSettings`,
  :class:`TrainingSettings`, :class:`LikelihoodSettings`), :class:`ScoreMLP`, :func:`dsm_loss`, the SDEs
  (:class:`VPSDE`, :class:`SubVPSDE`, :class:`VESDE`, :func:`make_sde`), :func:`pf_ode_likelihood`;
- features: :class:`EmbeddingSet`, :class:`FeaturePreprocessor` (PCA, normalisation variants),
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

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.ood.baselines": ("KNN", "Mahalanobis", "energy", "msp"),
        "lightning_methods.ood.cache": ("CorruptFileError", "EmbeddingCache", "StaleCacheError"),
        "lightning_methods.ood.diagnostics": ("anova", "delta_mu", "eta_squared", "select_encoders"),
        "lightning_methods.ood.embedding": ("EncoderModule", "embed"),
        "lightning_methods.ood.encoders": ("EncoderSpec", "build_encoder"),
        "lightning_methods.ood.features": ("EmbeddingDataModule", "FeaturePreprocessor", "EmbeddingSet"),
        "lightning_methods.ood.likelihood": ("pf_ode_likelihood",),
        "lightning_methods.ood.metrics": ("group_means", "ood_metrics"),
        "lightning_methods.ood.pvalues": ("TwoLevelMinGate", "ecdf_pvalues", "recalibrate", "tippett"),
        "lightning_methods.ood.rdm": ("RDMModule", "dsm_loss"),
        "lightning_methods.ood.rdm_settings": ("LikelihoodSettings", "SDESettings", "ScoreNetSettings",
                                               "TrainingSettings"),
        "lightning_methods.ood.score_net": ("ScoreMLP",),
        "lightning_methods.ood.sde": ("VESDE", "VPSDE", "SubVPSDE", "make_sde"),
    },
)
