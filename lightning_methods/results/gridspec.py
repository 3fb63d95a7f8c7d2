"""Pure pieces of the grid runner: ``--set`` parsing, combinations and their names, dotted config access, the W&B
sweep definition and the scheduler command list (no I/O, no training; see :mod:`lightning_methods.results.grid`)."""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from lightning_methods.runs import NEUTRAL_KEYS

#: Keys that never change results besides the run plumbing's neutral keys: run directories and the result writers.
GRID_NEUTRAL = NEUTRAL_KEYS | {"dirpath", "results", "predictions", "ckpt_path"}
#: Config keys that receive the seed of a run by default (the ones present in the resolved config are used).
DEFAULT_SEED_KEYS = ("seed_everything", "data.init_args.seed")


def split_values(text: str) -> list[str]:
    """Split ``"0.5,1.0,[1,2]"`` at the commas outside brackets, braces and quotes."""
    out, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    out.append("".join(current).strip())
    return out


def parse_sets(items: Sequence[str]) -> dict[str, list[str]]:
    """``["a.b=1,2", "c=x"]`` -> ``{"a.b": ["1", "2"], "c": ["x"]}`` (values stay strings: the CLI types them).

    Raises:
        ValueError: an item without ``=``, an empty value, or a key given twice.
    """
    sets: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=V1,V2,... (e.g. model.init_args.optimizer.init_args.rho="
                             "0.5,1.0)")
        parts = split_values(values)
        if any(p == "" for p in parts):
            raise ValueError(f"--set {item!r} has an empty value; separate values with commas and no trailing comma")
        if key in sets:
            raise ValueError(f"--set names {key!r} twice; give all its values in one --set {key}=V1,V2,...")
        sets[key] = parts
    return sets


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with (``...init_args.rho`` -> ``rho``)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(p for p in parts[-n:] if p != "init_args") or parts[-1]
            if not any(other != key and other.split(".")[-n:] == parts[-n:] for other in keys):
                names[key] = suffix
                break
        else:
            names[key] = key
    return names


def safe_name(text: str) -> str:
    """``text`` as a file-name part (no separators, spaces or shell-unfriendly characters)."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "_"


def combinations(sets: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every combination of the ``--set`` values, in the order given (the last key varies fastest)."""
    keys = list(sets)
    return [dict(zip(keys, values)) for values in itertools.product(*(sets[k] for k in keys))]


def combo_name(combo: Mapping[str, str], names: Mapping[str, str]) -> str:
    """Directory name of a combination (``rho=0.5,lr=0.1``); empty for the no-``--set`` grid."""
    return ",".join(safe_name(f"{names[k]}={v}") for k, v in combo.items())


def run_name(combo: Mapping[str, str], names: Mapping[str, str], seed: int) -> str:
    """Relative run path inside a configuration's directory: ``<combo>/seed<k>`` or ``seed<k>``."""
    combo_part = combo_name(combo, names)
    return f"{combo_part}/seed{seed}" if combo_part else f"seed{seed}"


def _entry(value: Any) -> Any:
    """What a dotted key reaches through ``value``: a list's last entry (as on the CLI, where
    ``--trainer.callbacks.init_args.prune_rate`` sets the last callback's argument), else ``value``."""
    return value[-1] if isinstance(value, list) and value and isinstance(value[-1], Mapping) else value


def flat_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dict (through a list of dicts, those of its last entry)."""
    if not isinstance(config, Mapping):
        return [prefix.rstrip(".")] if prefix else []
    out = []
    for key, value in config.items():
        value = _entry(value)
        out += flat_keys(value, f"{prefix}{key}.") if isinstance(value, Mapping) and value else [f"{prefix}{key}"]
    return out


def has_key(config: Mapping[str, Any], key: str) -> bool:
    """Whether the dotted ``key`` exists in ``config`` (through a list of dicts: in its last entry, as the CLI reads
    ``--trainer.callbacks.init_args.X``)."""
    node: Any = config
    for part in key.split("."):
        node = _entry(node)
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def check_keys(config: Mapping[str, Any], keys: Sequence[str], source: str) -> None:
    """Raise ``KeyError`` naming every key of ``keys`` missing in ``config`` with the closest existing keys."""
    known = flat_keys(config)
    for key in keys:
        if not has_key(config, key):
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"--set {key}: {source} has no such key{hint} (a key through a list, such as "
                           "trainer.callbacks.init_args.X, names its last entry, as on the command line; see the "
                           f"resolved config with `lightning-methods fit --config {source} --print_config`)")


def set_key(config: dict[str, Any], key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def delete_key(config: dict[str, Any], key: str) -> None:
    node: Any = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = _entry(node)
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    node = _entry(node)
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def sweep_definition(name: str, config_path: str, fit_args: Sequence[str], sets: Mapping[str, Sequence[str]],
                     seeds: Sequence[int], seed_key: str, monitor: str, mode: str) -> dict[str, Any]:
    """A W&B grid sweep over the seeds and ``--set`` values that runs ``lightning-methods fit`` for each point
    (W&B passes the values as ``--key=value``, the CLI's own syntax)."""
    parameters: dict[str, Any] = {seed_key: {"values": list(seeds)}}
    for key, values in sets.items():
        parameters[key] = {"values": [yaml.safe_load(v) for v in values]}
    return {
        "name": name, "method": "grid",
        "metric": {"name": monitor, "goal": "maximize" if mode == "max" else "minimize"},
        "parameters": parameters,
        "command": ["lightning-methods", "fit", "--config", config_path, *fit_args, "${args}"],
    }
