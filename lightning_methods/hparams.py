"""Checkpoint-safe hyperparameters.

torch >= 2.6 loads checkpoints with ``weights_only=True``, which refuses pickled callables such as the
``functools.partial`` optimizer factories users pass from Python. Checkpoints therefore store callables in the form
LightningCLI uses, ``{"class_path": "torch.optim.SGD", "init_args": {...}}``, and modules rebuild them with
:func:`callable_from_config` when ``load_from_checkpoint`` hands that form back.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

_PRIMITIVES = (str, int, float, bool, type(None))


def describe_callable(value: Any) -> Any:
    """Replace callables (classes, functions, ``functools.partial`` without positional args) by
    ``{"class_path", "init_args"}`` dicts, recursively; other values that are not plain data become strings."""
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, Mapping):
        return {k: describe_callable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(describe_callable(v) for v in value)
    if isinstance(value, functools.partial) and not value.args:
        return {"class_path": _path(value.func), "init_args": describe_callable(value.keywords)}
    if _is_jsonargparse_partial(value):  # what jsonargparse builds for OptimizerCallable & co. from a config
        return {"class_path": _path(value.args[-1]), "init_args": describe_callable(value.keywords)}
    if inspect.isclass(value) or (inspect.isfunction(value) and value.__name__ != "<lambda>"):
        return {"class_path": _path(value), "init_args": {}}
    return repr(value)


def _is_jsonargparse_partial(value: Any) -> bool:
    """``partial(<jsonargparse helper>, ..., cls, **init_args)``: jsonargparse's lazily instantiated callable."""
    return (isinstance(value, functools.partial) and bool(value.args) and inspect.isclass(value.args[-1])
            and getattr(value.func, "__module__", "").startswith("jsonargparse"))


def _path(obj: Any) -> str:
    return public_path(obj)


def public_path(obj: Any) -> str:
    """The shortest dotted import path that names ``obj``: ``lightning_methods.optim.SAM`` rather than
    ``lightning_methods.optim.sam.SAM``, ``torch.optim.SGD`` rather than ``torch.optim.sgd.SGD``. Checkpoints record
    this form, so they keep loading when a module moves inside its package."""
    module, qualname = obj.__module__, obj.__qualname__
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        candidate = ".".join(parts[:i])
        try:
            target: Any = importlib.import_module(candidate)
            for attr in qualname.split("."):
                target = getattr(target, attr)
        except (ImportError, AttributeError):
            continue
        if target is obj:
            return f"{candidate}.{qualname}"
    return f"{module}.{qualname}"


def is_callable_config(value: Any) -> bool:
    return isinstance(value, Mapping) and "class_path" in value and set(value) <= {"class_path", "init_args"}


def import_path(path: str) -> Any:
    """The object named by a dotted import path (``"torch.optim.SGD"``, ``"lightning_methods.ImageClassifier"``)."""
    module, _, name = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:  # a nested attribute path, e.g. "pkg.module.Class.Inner"
        parent, _, outer = module.rpartition(".")
        obj = getattr(importlib.import_module(parent), outer)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def callable_from_config(value: Any, what: str = "callable") -> Any:
    """Inverse of :func:`describe_callable` for ``{"class_path", "init_args"}`` dicts (nested ones included);
    anything else is returned unchanged.

    Raises:
        ImportError: a ``class_path`` cannot be imported (a class defined in a notebook, in a script run as
            ``__main__`` or inside a function), naming ``what`` (the module argument) and how to load anyway.
    """
    if not is_callable_config(value):
        return value
    path = value["class_path"]
    try:
        obj = import_path(path)
    except (ImportError, AttributeError, ValueError) as err:
        raise ImportError(
            f"model argument {what}: {path!r}, recorded in the checkpoint's hyperparameters, cannot be imported here "
            f"({type(err).__name__}: {err}). A class or function defined in a notebook, in a script run as __main__ "
            "or inside a function cannot be found by its path in another process: define it in an importable module, "
            f"or give the argument when loading: load_from_checkpoint(path, {what}=...) (None: the default)."
        ) from err
    kwargs = {k: callable_from_config(v, what) for k, v in (value.get("init_args") or {}).items()}
    return functools.partial(obj, **kwargs)


def recorded_factory(value: Any, what: str) -> Any:
    """The factory argument ``what`` (``optimizer`` / ``lr_scheduler``) as given, or rebuilt from the form a checkpoint
    records: a ``{"class_path", "init_args"}`` dict is rebuilt; text - what a checkpoint records for a factory it
    cannot name by import path (a lambda, a partial with positional arguments, a callable object) - becomes a
    factory that says so when it is called, so such a checkpoint still loads for evaluation."""
    if not isinstance(value, str):
        return callable_from_config(value, what)

    def unrecorded(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(
            f"model argument {what} is {value!r}: text, not a callable. A checkpoint records a factory that it "
            "cannot name by import path (a lambda, a functools.partial with positional arguments, a callable object) "
            f"as its text, which cannot be rebuilt: give it when loading, load_from_checkpoint(path, {what}=...), or "
            "use a class or a functools.partial with keyword arguments only."
        )

    return unrecorded


def checkpoint_safe(hparams: Mapping[str, Any], module_class: type | None = None) -> dict[str, Any]:
    """A copy of ``hparams`` that ``torch.load(weights_only=True)`` accepts; LightningCLI's ``_class_path`` entry
    (the module's class as the config spelled it) becomes the shortest public path of ``module_class``."""
    out = {k: describe_callable(v) for k, v in hparams.items()}
    if module_class is not None and "_class_path" in out:
        out["_class_path"] = public_path(module_class)
    return out
