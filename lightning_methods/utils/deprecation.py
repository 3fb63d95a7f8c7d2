"""Thin shims that keep moved modules and renamed classes importable at their old names for one release, with a
warning."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any


def moved_module(old: str, new: str) -> None:
    """Make module ``old`` (the caller, already in ``sys.modules``) an alias of module ``new``: every attribute of
    ``new`` is copied into it and a ``DeprecationWarning`` names the new path."""
    warnings.warn(f"{old} moved to {new}; the old module path will be removed in the next release",
                  DeprecationWarning, stacklevel=3)
    target = importlib.import_module(new)
    namespace = sys.modules[old].__dict__
    for key, value in vars(target).items():
        if not (key.startswith("__") and key.endswith("__")):
            namespace[key] = value
    namespace["__all__"] = list(getattr(target, "__all__", [k for k in vars(target) if not k.startswith("_")]))


def renamed_attributes(module: str, renames: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving old attribute names: ``renames`` maps old name -> new name in ``module``;
    accessing an old name warns and returns the new object (same class, so isinstance and checkpoints agree)."""

    def __getattr__(name: str) -> Any:
        if name in renames:
            new = renames[name]
            warnings.warn(f"{module}.{name} was renamed to {module}.{new}; the old name will be removed in the next "
                          "release", DeprecationWarning, stacklevel=2)
            return getattr(sys.modules[module], new)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
