"""Hyperspherical Prototype Networks (HPN) with the t-weighted multi-task loss.

Mettes, van der Pol, Snoek. *Hyperspherical Prototype Networks*. NeurIPS 2019, arXiv 1901.10514 (official code:
psmmettes/hpn). Class prototypes are fixed before training, spread over the unit sphere; the network output is pulled
towards its class prototype with a squared-cosine loss (summed over the batch) and classified by the nearest
prototype in cosine. Regression uses two antipodal prototypes; both tasks share one output and one loss,
``L_m = t L_c + (1 - t) L_r`` (the authors' response: robust to t, best at t = 0.25).

Public classes and functions:
- :class:`HPNClassifier` (an ``ImageClassifier``; top-1 / top-5 from cosine similarities), :class:`HPNRegressor`,
  :class:`HPNMultiTask` (``task_weight=t``);
- prototypes: :func:`optimize_prototypes` (official update by default, persistent momentum as an option, semantic
  priors from a class-embedding file), :func:`build_prototypes`, :func:`save_prototypes`, :func:`load_prototypes`;
- losses (pure functions): ``lightning_methods.losses.hpn``;
- backbone: ``hpn_resnet32`` (the official ResNet-32 with its 3x3 stride-2 shortcut), ``lightning_methods.models.
  hpn_resnet``.

Family files: command ``lightning-methods prototypes`` (``lightning_methods.hpn.cli``, not imported here); t-sweep
runner ``lightning-methods hpn-sweep``; DataModule ``lightning_methods.datamodules.
DigitsRegressionDataModule`` (digits with a real-valued per-image target); configs ``configs/hpn/``; doc
``docs/methods/hpn.md``; tests ``tests/hpn/``; benchmark section ``benchmarks/hpn_cases.py``.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.hpn.classifier": ("HPNClassifier",),
        "lightning_methods.hpn.prototypes": (
            "build_prototypes", "load_class_embeddings", "load_prototypes", "optimize_prototypes",
            "prototype_filename", "save_prototypes", "semantic_neighbour_masks", "semantic_ranking_loss",
            "separation_loss",
        ),
        "lightning_methods.hpn.regression": ("HPNMultiTask", "HPNRegressor"),
    },
)
