"""Learning with noisy labels: co-training with EMA teachers, learning-time (FkL) selection and Early Cutting.

Paper: Yuan, Feng, Han, Liu, *Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy Examples*,
NeurIPS 2025 (arXiv 2502.08227; official code tmllab/2025_NeurIPS_MEE).

Public classes and functions:
- :class:`CoTrainingClassifier`, :class:`EMAModel`, :func:`mutual_kd_loss` (``cotraining.py``): the two-network
  learner of the selection rounds.
- :mod:`.selection`: learning-time counters, FkL order and the cut as pure functions; :func:`compute_early_cut`
  (``cut.py``) runs the cut on a trained model; :class:`SelectionConfig` (``config.py``) holds the procedure's
  settings.
- The multi-round runner (``runner.py``, :class:`EarlyCuttingRunner`) and its command ``lightning-methods select`` /
  ``lightning-methods-select`` (``cli.py``) are not imported here.

Elsewhere in the family: the callbacks :class:`lightning_methods.callbacks.PredictionHistoryCallback`
(``callbacks/prediction_history.py``) and :class:`lightning_methods.callbacks.TestAccuracyTracker`
(``callbacks/accuracy_tracker.py``); the DataModules ``NoisyCIFAR10DataModule``, ``NoisyCIFAR100DataModule``,
``NoisyDigitsDataModule`` (``datamodules/noisy_*.py``) with the noise generators in ``datamodules/label_noise.py``;
configs in ``configs/noisy_labels/``; the doc ``docs/methods/noisy_labels.md``; tests in ``tests/noisy_labels/``.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.noisy_labels.config": ("SelectionConfig",),
        "lightning_methods.noisy_labels.cotraining": ("CoTrainingClassifier", "EMAModel", "mutual_kd_loss"),
        "lightning_methods.noisy_labels.cut": ("compute_early_cut",),
        "lightning_methods.noisy_labels.selection": ("CutResult",),
    },
)
