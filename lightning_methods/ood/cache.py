"""The embedding cache: features of one (encoder, image set) pair per file, with the encoder, its preprocessing and
the image set recorded next to them, so a rerun reuses them and any change invalidates them.

Layout: ``<root>/<encoder>/<dataset>.pt`` (features, index, targets, logits and the fingerprint, written atomically,
loaded with ``weights_only=True``) and ``<root>/<encoder>/<dataset>.json`` (the fingerprint, for people). The
fingerprint holds the encoder (kind, name, SHA-256 of its weights and of its weights file, preprocessing) and the
image set (its spec and the SHA-256 of its pixels and labels). An entry is used only when the fingerprint stored
*inside* the feature file equals the expected one; a mismatch names the fields that differ.

Policies: ``"reuse"`` (use valid entries, recompute stale or missing ones), ``"require"`` (fail on a stale or
missing entry: for offline machines without the encoder), ``"refresh"`` (always recompute).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch

from ..utils import atomic_torch_save, atomic_write_json, safe_torch_load
from .features import FeatureSet

CachePolicy = Literal["reuse", "require", "refresh"]


class StaleCacheError(ValueError):
    """A cached feature file does not belong to the requested encoder / preprocessing / image set."""


def content_hash(*tensors: torch.Tensor) -> str:
    """SHA-256 over the shapes, dtypes and bytes of tensors (the pixels and labels of an image set)."""
    digest = hashlib.sha256()
    for t in tensors:
        shape, t = tuple(t.shape), t.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{shape}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def fingerprint_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the fields that differ between two nested fingerprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += fingerprint_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "<root>"]


class EmbeddingCache:
    """Feature files under ``root`` (see the module docstring).

    Args:
        root: cache directory (shared by runs that embed the same sets).
        policy: ``"reuse"``, ``"require"`` or ``"refresh"``.
    """

    def __init__(self, root: str | Path, policy: CachePolicy = "reuse") -> None:
        if policy not in ("reuse", "require", "refresh"):
            raise ValueError(f"cache policy must be 'reuse', 'require' or 'refresh', got {policy!r}")
        self.root, self.policy = Path(root).expanduser(), policy

    def path(self, encoder: str, dataset: str) -> Path:
        return self.root / encoder / f"{dataset}.pt"

    def load(self, encoder: str, dataset: str, fingerprint: dict[str, Any]) -> FeatureSet:
        """The cached features, checked against ``fingerprint``.

        Raises:
            FileNotFoundError: no entry.
            StaleCacheError: the entry was written for another encoder, preprocessing or image set (the message
                lists the differing fields).
        """
        path = self.path(encoder, dataset)
        try:
            data = safe_torch_load(path, what=f"feature cache of {encoder}/{dataset}")
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:  # garbage bytes can fail inside the unpickler with any error
            raise ValueError(f"feature cache {path} is truncated or not a torch file ({type(err).__name__}: {err}); "
                             "it will be recomputed under cache policy 'reuse'") from err
        stored = json.loads(data.get("fingerprint", "null")) if isinstance(data, dict) else None
        expected = _plain(fingerprint)
        if stored != expected:
            diff = fingerprint_diff(stored, expected) if isinstance(stored, dict) else ["<no fingerprint>"]
            raise StaleCacheError(
                f"feature cache {path} was written for other inputs (differs in: {', '.join(diff)}); it is never "
                "reused for the wrong encoder, preprocessing or images. Recompute it (cache policy 'reuse' or "
                "'refresh') or point cache_dir elsewhere.")
        return FeatureSet.from_dict(data)

    def lookup(self, encoder: str, dataset: str, fingerprint: dict[str, Any]) -> tuple[FeatureSet | None, str]:
        """``(features, "")`` for a valid entry, else ``(None, reason)``; under ``"require"`` a missing or stale
        entry raises instead.

        Raises:
            FileNotFoundError / StaleCacheError: under policy ``"require"``.
        """
        path = self.path(encoder, dataset)
        if self.policy == "refresh":
            return None, "cache policy 'refresh'"
        try:
            return self.load(encoder, dataset, fingerprint), ""
        except FileNotFoundError:
            if self.policy == "require":
                raise FileNotFoundError(f"no cached features for {encoder}/{dataset} at {path} and cache policy "
                                        "'require' forbids computing them") from None
            return None, "not cached"
        except (StaleCacheError, ValueError) as err:
            if self.policy == "require":
                raise
            return None, str(err)

    def store(self, encoder: str, dataset: str, features: FeatureSet, fingerprint: dict[str, Any]) -> Path:
        """Write an entry atomically (call on one rank only)."""
        path = self.path(encoder, dataset)
        plain = _plain(fingerprint)
        atomic_torch_save({**features.to_dict(), "fingerprint": json.dumps(plain, sort_keys=True)}, path)
        atomic_write_json(path.with_suffix(".json"), {"fingerprint": plain, "samples": len(features.index),
                                                      "dim": features.dim, "has_logits": features.logits is not None})
        return path
