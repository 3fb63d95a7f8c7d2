"""Multi-bit quantization: Any-Precision DNNs and EMQ.

- EMQ: Kim, An, Jeon, Ko. *Efficient Multi-bit Quantization Network Training via Weight Bias Correction and Bit-wise
  Coreset Sampling*. NeurIPS 2025, arXiv 2510.20673 (weight bias correction + shared BN, bit-wise coresets).
- Baseline: Yu, Li, Shi, Huang, Hua. *Any-Precision Deep Neural Networks*. arXiv 1911.07346 (official code
  SHI-Labs/Any-Precision-DNNs; switchable BN, recursive supervision).
- Optional quantizer: LSQ, Esser et al. *Learned Step Size Quantization*. ICLR 2020, arXiv 1902.08153, with one
  learned step per trained bit-width (``quantize_model(..., quantizer="lsq")``).

Public parts: :class:`MultiBitClassifier` (the LightningModule), :func:`quantize_model` (float network -> multi-bit
network), :func:`recalibrate_bn` / :func:`bn_stats` / :func:`load_bn_stats` (BatchNorm statistics per bit-width),
the coreset functions (:func:`el2n_scores`, :func:`grand_last_layer_scores`, :func:`select_coreset`,
:func:`bitwise_epoch_order`, :func:`coreset_size`, :func:`refresh_due`) and :class:`TrainingCost`. Quantized layers,
quantizers and ``set_bits`` live in ``lightning_methods.layers`` (``layers/quantized.py``); the backbone
``resnet20x5`` in ``lightning_methods/models/preact_resnet.py``.

Family files: callback ``lightning_methods.callbacks.BitwiseCoresetCallback`` (callbacks/bitwise_coreset.py),
DataModules: the package's CIFAR / digits DataModules; configs ``configs/quantization/``;
doc ``docs/methods/quantization.md``;
tests ``tests/quantization/``; benchmark section ``benchmarks/quantization_cases.py``.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.quantization.bn": ("batchnorms", "bn_stats", "load_bn_stats", "recalibrate_bn"),
        "lightning_methods.quantization.convert": (
            "DEFAULT_FLOAT_WEIGHT_LAYERS", "DEFAULT_PLAIN_BN_LAYERS", "classifier_layer", "quantize_model",
        ),
        "lightning_methods.quantization.coreset": (
            "bitwise_epoch_order", "coreset_size", "el2n_scores", "grand_last_layer_scores", "refresh_due",
            "select_coreset", "union_fraction",
        ),
        "lightning_methods.quantization.cost": ("TrainingCost",),
        "lightning_methods.quantization.module": ("CALIBRATED_BITS", "MultiBitClassifier"),
    },
)
