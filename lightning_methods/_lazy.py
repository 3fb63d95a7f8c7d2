"""Lazy re-exports for package ``__init__`` files (the module-level ``__getattr__`` pattern of PEP 562, as torch and
scipy use for their submodules): a name is imported from its defining module on first access, so importing a
package costs only what the names a caller uses need (``from lightning_methods.optim import SAMON`` loads torch and
the SAM modules, not Lightning, plotting or W&B)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` serving ``exports`` (defining module -> public names).

    An exported name is imported from its module on first access and then stored in the package namespace, so later
    accesses are plain attribute lookups. Unknown names raise ``AttributeError`` naming the package.
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
