"""ViT locality from the training protocol: Baseline vs Modern protocol, CutMix ablation, attention locality.

Paper: Eduardo Antonio Santiago Toledo, Asael Fabian Martinez, "Inducing Spatial Locality in Vision Transformers
through the Training Protocol", arXiv 2605.16390 (no code release). A ViT trained from scratch on small datasets
learns local early-layer attention from the training protocol alone; CutMix is the component that decides it.

Public classes and functions:
- :class:`ViTLocalityClassifier`: ImageClassifier with a ViT-Lite backbone and training accuracy against the
  dominant CutMix label (``train/acc_dominant``).
- :func:`protocol_name`, :func:`protocol_components`, :data:`CONDITIONS`: the eight ablation conditions.
- :func:`locality_table`, :func:`markdown_table`, :func:`write_report`: the paper-style table from checkpoint records
  (:func:`strict_json`: NaN -> null for the JSON files).
- :class:`LocalitySettings`: what the ``AttentionLocality`` callback measures (``settings:`` in YAML).

The family's other parts:
- backbones ``vit_lite_7_4`` / ``vit_lite_7_8`` (``lightning_methods/models/vit.py``, timm VisionTransformer);
- measures and attention extraction: ``lightning_methods/analysis/attention.py`` (MAD with three normalisations,
  normalized entropy, ``attention_locality``) and ``analysis/attention_extract.py`` (``AttentionRecorder``);
- callback ``lightning_methods.callbacks.AttentionLocality`` (W&B images plus PNG/NPY/JSON files);
- DataModule ``lightning_methods.datamodules.TinyImageNetDataModule`` (and ``load_tinyimagenet_split``); the protocol
  switches are ``augment`` (autoaugment / colorjitter) and ``cutmix_alpha`` of every ImageDataModule and the
  classifier's ``label_smoothing``; schedule ``lightning_methods.optim.warmup_cosine.WarmupCosineLR``;
- command ``lightning-methods locality`` (``lightning_methods/vit_locality/cli.py``, not imported here);
- configs ``configs/vit_locality/``, doc ``docs/methods/vit_locality.md``, tests ``tests/vit_locality/``, benchmark
  ``benchmarks/vit_locality_cases.py``.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.vit_locality.module": (
            "CONDITIONS", "ViTLocalityClassifier", "dominant_label", "protocol_components", "protocol_name",
        ),
        "lightning_methods.vit_locality.report": ("locality_table", "markdown_table", "strict_json", "write_report"),
        "lightning_methods.vit_locality.settings": ("LocalitySettings",),
    },
)
