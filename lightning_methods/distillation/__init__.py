"""Logit distillation: KD, DKD and the DeepKD trainer, one small class per method over one base.

Papers: Huang et al., *DeepKD: A Deeply Decoupled and Denoised Knowledge Distillation Trainer*, NeurIPS 2025
(arXiv 2505.15133); Zhao et al., *Decoupled Knowledge Distillation*, CVPR 2022 (arXiv 2203.08679); Hinton et al.,
*Distilling the Knowledge in a Neural Network* (arXiv 1503.02531).

Public classes and functions:
- :class:`DistillationClassifier` (``base.py``): the base (teacher loading and freezing, teacher forward, logging,
  checkpoints); a method adds its terms in ``distillation_terms``.
- :class:`KDClassifier` (``kd.py``), :class:`DKDClassifier` (``dkd.py``), :class:`DeepKDClassifier` (DKD + DeepKD)
  and :class:`KDDeepKDClassifier` (KD + DeepKD) (``deepkd.py``); :func:`distiller_class` picks one by
  ``(method, deepkd)``.
- :func:`load_teacher`, :func:`resolve_teacher_path`, :func:`extract_state_dict`, :func:`state_hash`
  (``teacher.py``): strict, weights-only teacher loading from the shared CIFAR-100 teacher files or
  lightning-methods checkpoints.

Elsewhere in the family: the loss terms in :mod:`lightning_methods.losses.kd`, the DeepKD optimizer
:class:`lightning_methods.optim.DeepKD`, the top-k schedule callback
:class:`lightning_methods.callbacks.TopKScheduleCallback` (``callbacks/deepkd_topk.py``), the DataModule
:class:`lightning_methods.datamodules.CIFAR100DataModule`, configs in ``configs/distillation/`` (teachers in
``configs/distillation/teachers/``), the doc ``docs/methods/distillation.md`` and tests in ``tests/distillation/``.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.distillation.base": ("CKPT_KEY", "DistillationClassifier"),
        "lightning_methods.distillation.kd": ("KDClassifier",),
        "lightning_methods.distillation.dkd": ("DKDClassifier",),
        "lightning_methods.distillation.deepkd": (
            "DeepKDClassifier", "DeepKDMixin", "KDDeepKDClassifier", "all_reduce_streams", "distiller_class",
        ),
        "lightning_methods.distillation.teacher": (
            "extract_state_dict", "load_teacher", "resolve_teacher_path", "state_hash",
        ),
    },
)
