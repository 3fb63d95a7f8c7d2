"""Deprecated location: moved to :mod:`lightning_methods.distillation.teacher` (removed in the next release)."""

from lightning_methods.utils.deprecation import moved_module

moved_module(__name__, "lightning_methods.distillation.teacher")
