"""The embedding cache: features of one (encoder, image set) pair per file, with the encoder, its preprocessing and
the image set recorded next to them, so a rerun reuses them and any change invalidates them.

Layout: ``<root>/<encoder>/<dataset>.pt`` (features, index, targets, logits and the fingerprint, written atomically,
loaded with ``weights_only=True``), ``<root>/<encoder>/<dataset>.pt.sha256`` (its SHA-256, written and verified as
checkpoints are: :mod:`lightning_methods.checkpoint_io`) and ``<root>/<encoder>/<dataset>.json`` (the fingerprint, for
people). The
fingerprint holds the encoder (kind, name, SHA-256 of its weights and of its weights file, preprocessing) and the
image set (its spec and the SHA-256 of its pixels and labels). An entry is used only when the fingerprint stored
*inside* the feature file equals the expected one; a mismatch names the fields that differ.

Every entry is verified against its recorded SHA-256 before it is unpickled (without the ``.sha256`` file: against
the digest stored inside it): a flipped byte, a truncated file or a missing checksum stops with
:class:`CorruptFileError` naming the file (never a silent reload of damaged features).
:func:`save_verified` / :func:`load_verified` do the same for the pipeline's stage outputs (splits, RDMs, scores).

Policies: ``"reuse"`` (use valid entries, recompute stale or missing ones, stop on corrupt ones), ``"require"`` (fail
on a stale or missing entry: for offline machines without the encoder), ``"refresh"`` (always recompute; the way to
replace a corrupt entry, besides deleting it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_methods.checkpoint_io import DIGEST_KEY, payload_digest, recorded_hashes, write_checkpoint
from lightning_methods.ood.features import EmbeddingSet
from lightning_methods.runs import fingerprint_diff
from lightning_methods.utils import atomic_write_json, safe_torch_load
from lightning_methods.utils.io import sha256_file

CachePolicy = Literal["reuse", "require", "refresh"]


class StaleCacheError(ValueError):
    """A cached feature file does not belong to the requested encoder / preprocessing / image set."""


class CorruptFileError(ValueError):
    """A cache entry or stage output differs from the checksum recorded when it was written (or has none)."""


REFRESH_HINT = "run the command again with --cache_policy refresh to recompute it, or delete the file"


def save_verified(obj: dict[str, Any], path: str | Path) -> str:
    """Write the dict ``obj`` atomically with its SHA-256 in ``<path>.sha256`` and a digest of its content inside it
    (:func:`lightning_methods.checkpoint_io.write_checkpoint`; call on one rank only); returns the file's SHA-256."""
    path = write_checkpoint(obj, path, keep_previous=False, check_finite=False)
    return recorded_hashes(path)[0]


def load_verified(path: str | Path, what: str, hint: str = REFRESH_HINT) -> Any:
    """Load a file written by :func:`save_verified` after checking its SHA-256 (``weights_only``).

    Raises:
        FileNotFoundError: no file.
        CorruptFileError: no recorded checksum, a checksum mismatch (flipped bytes, truncation) or an unreadable
            file; the message names the file and ``hint`` (what to do).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    expected = recorded_hashes(path)
    actual = sha256_file(path) if expected else None
    if expected and actual not in expected:
        raise CorruptFileError(f"{what} {path} is corrupt: its SHA-256 {actual[:16]}... differs from the one recorded "
                               f"in {path.name}.sha256 when it was written (damaged or truncated): {hint}")
    try:
        data = safe_torch_load(path, what=what)
    except ValueError as err:
        raise CorruptFileError(f"{what} {path} cannot be read ({err}): {hint}") from err
    if not isinstance(data, dict) or (not expected and DIGEST_KEY not in data):
        raise CorruptFileError(f"{what} {path} has no recorded checksum ({path.name}.sha256 is missing and the file "
                               f"carries no digest), so its content cannot be trusted: {hint}")
    if not expected and payload_digest(data) != data[DIGEST_KEY]:  # a copy without its sidecar: the digest inside
        raise CorruptFileError(f"{what} {path} is corrupt: its content differs from the SHA-256 digest stored inside "
                               f"it when it was written: {hint}")
    data.pop(DIGEST_KEY, None)
    return data


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

    def load(self, encoder: str, dataset: str, fingerprint: dict[str, Any]) -> EmbeddingSet:
        """The cached features, checked against their recorded SHA-256 and against ``fingerprint``.

        Raises:
            FileNotFoundError: no entry.
            CorruptFileError: the bytes differ from the recorded checksum, or none is recorded (the message names
                the file and says to use ``--cache_policy refresh`` or delete it).
            StaleCacheError: the entry was written for another encoder, preprocessing or image set (the message
                lists the differing fields).
        """
        path = self.path(encoder, dataset)
        data = load_verified(path, f"feature cache of {encoder}/{dataset}")
        stored = json.loads(data.get("fingerprint", "null")) if isinstance(data, dict) else None
        expected = _plain(fingerprint)
        if stored != expected:
            diff = fingerprint_diff(stored, expected) if isinstance(stored, dict) else ["<no fingerprint>"]
            raise StaleCacheError(
                f"feature cache {path} was written for other inputs (differs in: {', '.join(diff)}); it is never "
                "reused for the wrong encoder, preprocessing or images. Recompute it (cache policy 'reuse' or "
                "'refresh') or point cache_dir elsewhere.")
        return EmbeddingSet.from_dict(data)

    def lookup(self, encoder: str, dataset: str, fingerprint: dict[str, Any]) -> tuple[EmbeddingSet | None, str]:
        """``(features, "")`` for a valid entry, else ``(None, reason)``; under ``"require"`` a missing or stale
        entry raises instead; a corrupt entry always raises (``"refresh"`` never reads it).

        Raises:
            FileNotFoundError / StaleCacheError: under policy ``"require"``.
            CorruptFileError: the entry's bytes differ from its recorded checksum.
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
        except StaleCacheError as err:
            if self.policy == "require":
                raise
            return None, str(err)

    def store(self, encoder: str, dataset: str, features: EmbeddingSet, fingerprint: dict[str, Any]) -> str:
        """Write an entry atomically with its checksum (call on one rank only); returns its SHA-256."""
        path = self.path(encoder, dataset)
        plain = _plain(fingerprint)
        digest = save_verified({**features.to_dict(), "fingerprint": json.dumps(plain, sort_keys=True)}, path)
        atomic_write_json(path.with_suffix(".json"), {"fingerprint": plain, "samples": len(features.index),
                                                      "dim": features.dim, "has_logits": features.logits is not None,
                                                      "sha256": digest})
        return digest
