"""Per-family hooks for tests/core/test_configs.py, which runs every shipped YAML through ``main(["fit", ...])``.

A family registers a hook for a directory prefix under ``configs/`` in its own module
``tests/<family>/overrides_<family>.py`` (every ``overrides_*.py`` under ``tests/`` is imported below). The hook
gets ``(config_path, tmp_path, data_root)`` and returns extra CLI arguments (e.g. a teacher checkpoint written by
the test), or ``None`` to say the file is not a ``fit`` config and name the test that covers it instead (set
``reason`` on the hook: ``hook.reason = "covered by tests/<family>/test_x.py::test_y"``). A hook that swaps a
backbone or shrinks a batch for speed says so with :func:`note_swap`, and the test prints it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

Hook = Callable[[Path, Path, Path], "list[str] | None"]
HOOKS: dict[str, Hook] = {}


def register(prefix: str) -> Callable[[Hook], Hook]:
    """Register a hook for every config whose path relative to ``configs/`` starts with ``prefix``."""

    def deco(fn: Hook) -> Hook:
        HOOKS[prefix] = fn
        return fn

    return deco


SWAPS: list[str] = []  # what hooks swapped for speed, printed in the test session summary


def note_swap(rel: str, what: str) -> None:
    """Record that the smoke fit of config ``rel`` runs with ``what`` changed (e.g. "backbone wrn_28_10 ->
    resnet8"), so the test output says it did not run the config exactly as shipped."""
    SWAPS.append(f"{rel}: {what}")


def hook_for(rel: str) -> Hook | None:
    matches = [p for p in HOOKS if rel.startswith(p)]
    return HOOKS[max(matches, key=len)] if matches else None


def _load(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"config_overrides_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]


for _path in sorted(Path(__file__).parent.rglob("overrides_*.py")):
    _load(_path)
