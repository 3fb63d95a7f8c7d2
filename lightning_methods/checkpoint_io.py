"""Crash-safe, verified checkpoints: :class:`SafeCheckpointIO`, a Lightning ``CheckpointIO`` plugin.

Writing (rank zero):

- **Atomic.** The checkpoint goes to a temporary file in the same directory, is flushed to disk and replaces the
  target with ``os.replace``: a kill or a full disk leaves the old file or the new one, never a truncated one.
- **Checksum.** The SHA-256 of every written file is recorded beside it in ``<file>.sha256`` (``sha256sum`` format,
  so ``sha256sum -c last.ckpt.sha256`` checks it by hand). While the file is being replaced the record lists the old
  and the new hash, so a kill between the two renames never makes a good file look corrupt.
- **Digest inside.** The checkpoint also carries the SHA-256 of its own payload (every key, value and tensor byte
  except the digest itself, :func:`payload_digest`) under :data:`DIGEST_KEY`, so a copy made without its ``.sha256``
  file is still verified when it loads.
- **Previous version.** A file that is overwritten (``last.ckpt``) keeps its previous version as
  ``previous-<name>`` (a hard link: no copy, no extra write), so a corrupt ``last.ckpt`` always has a good
  predecessor one epoch older.
- **Finite weights only.** A state dict holding NaN or inf is refused (:class:`NonFiniteCheckpointError`) and the
  existing file is left untouched: a diverged run never overwrites its last good checkpoint.

Reading (``Trainer.fit/validate/test/predict(ckpt_path=...)``, and the CLI before it builds anything):

- the recorded checksum is verified (or, for a file without ``.sha256``, the digest stored inside it); a mismatch, a
  truncated file or NaN/inf weights raise :class:`CorruptCheckpointError` / :class:`NonFiniteCheckpointError` naming
  the file and the newest intact checkpoint beside it (with the exact ``--ckpt_path`` to resume from);
- files load with ``weights_only=True`` unless the caller passes ``weights_only=False`` explicitly (warns).

How it is installed: :class:`lightning_methods.callbacks.LatestCheckpoint` (the CLI's ``--checkpoint.*`` group and the
Early Cutting runner use it) replaces the strategy's default ``TorchCheckpointIO`` with this plugin in ``setup``
(``safe_io=True``); a Trainer of your own can take it directly: ``Trainer(plugins=[SafeCheckpointIO()])``. Custom
or wrapping CheckpointIO plugins (async, sharded) are left alone.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_methods.utils.io import disk_full_error, mkstemp_like_open, safe_torch_load, sha256_file

SIDECAR_SUFFIX = ".sha256"
#: key of the checkpoint dict that holds :func:`payload_digest` of the rest of the checkpoint
DIGEST_KEY = "lightning_methods_payload_sha256"
PREVIOUS_PREFIX = "previous-"
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> verified hash: the CLI checks a file before
# it builds anything and the Trainer loads it seconds later; it is hashed once


class CorruptCheckpointError(ValueError):
    """A checkpoint is truncated, damaged, or differs from the checksum recorded when it was written."""


class NonFiniteCheckpointError(ValueError):
    """A checkpoint (to be written or just read) holds NaN or inf weights."""


def checksum_path(path: str | Path) -> Path:
    """Where the checksum of ``path`` is recorded (``<file>.sha256``, beside the real file of a symlink)."""
    path = Path(path)
    real = path.resolve() if path.is_symlink() else path
    return real.with_name(real.name + SIDECAR_SUFFIX)


def recorded_hashes(path: str | Path) -> list[str]:
    """The SHA-256 hashes recorded for ``path`` (empty when it was not written by :class:`SafeCheckpointIO`)."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return []
    return [line.split()[0] for line in sidecar.read_text().splitlines() if line.strip()]


def _write_sidecar(path: Path, hashes: list[str]) -> None:
    from lightning_methods.utils.io import atomic_write_text

    atomic_write_text(checksum_path(path), "".join(f"{h}  {path.name}\n" for h in hashes))


def verify_checksum(path: str | Path) -> bool:
    """``True`` if ``path`` matches its recorded checksum, ``False`` if nothing is recorded; raises
    :class:`CorruptCheckpointError` (naming the newest intact checkpoint beside it) on a mismatch."""
    path = Path(path)
    expected = recorded_hashes(path)
    if not expected:
        return False
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    actual = _VERIFIED.get(key) or sha256_file(path)
    if actual not in expected:
        reason = f"its SHA-256 {actual[:16]}... differs from the one recorded in {checksum_path(path).name}"
        raise CorruptCheckpointError(corrupt_message(path, reason + " when it was written"))
    _VERIFIED[key] = actual
    return True


def intact_alternatives(path: str | Path) -> list[Path]:
    """Other checkpoints in the directory of ``path`` whose recorded checksum verifies, newest first."""
    path = Path(path)
    found = []
    for other in path.parent.glob("*.ckpt"):
        if other.resolve() == path.resolve() or not recorded_hashes(other):
            continue
        with contextlib.suppress(CorruptCheckpointError, OSError):
            if verify_checksum(other):
                found.append(other)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def corrupt_message(path: str | Path, reason: str) -> str:
    """``"checkpoint <path> is corrupt (<reason>). <where to resume from instead>"``."""
    path = Path(path)
    alternatives = intact_alternatives(path)
    if alternatives:
        alt = alternatives[0]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alt.stat().st_mtime))
        hint = (f"The previous good checkpoint is {alt} (written {when}); resume from it with --ckpt_path {alt}")
    else:
        hint = f"No intact checkpoint with a recorded checksum was found beside it in {path.parent}."
    return f"checkpoint {path} is corrupt ({reason}). {hint}"


def non_finite_entries(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold NaN or inf (one host sync per device)."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) and value.numel():
            by_device.setdefault(value.device, []).append((name, torch.isfinite(value).all()))
    bad = []
    for items in by_device.values():
        ok = torch.stack([flag for _, flag in items]).tolist()
        bad += [name for (name, _), good in zip(items, ok) if not good]
    return bad


def _feed(digest: Any, value: Any) -> None:
    """Feed ``value`` into ``digest`` with its type and structure, so that equal payloads (and only those) hash equally
    after a save / load round trip (dict and OrderedDict alike; tuples and lists apart; tensors by dtype, shape and
    bytes)."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        digest.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.layout == torch.strided and t.device.type != "meta":
            data = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
            digest.update(memoryview(data.view(torch.uint8).numpy()))
        else:
            digest.update(repr(t).encode())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}|".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (set, frozenset)):  # iteration order depends on string hashing, which differs per process
        digest.update(f"E{len(value)}|".encode())
        for text in sorted(repr(item) for item in value):
            _feed(digest, text)
    elif isinstance(value, (str, bytes)):
        raw = value.encode() if isinstance(value, str) else value
        digest.update(f"{'S' if isinstance(value, str) else 'B'}{len(raw)}|".encode() + raw)
    else:  # numbers, None, dtypes, ...: their repr is exact (floats round-trip) and survives a load
        digest.update(f"O{type(value).__name__}:{value!r}|".encode())


def payload_digest(checkpoint: Mapping[str, Any]) -> str:
    """Hex SHA-256 of everything in ``checkpoint`` except :data:`DIGEST_KEY`: keys, values, structure and the bytes of
    every tensor. Computed on the dict before it is written and again on the dict that was loaded."""
    import hashlib

    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in checkpoint.items() if k != DIGEST_KEY})
    return digest.hexdigest()


def check_payload_digest(path: str | Path, checkpoint: Any) -> bool:
    """``True`` if ``checkpoint`` (loaded from ``path``) carries a digest and matches it, ``False`` if it carries none;
    raises :class:`CorruptCheckpointError` on a mismatch."""
    if not isinstance(checkpoint, Mapping) or DIGEST_KEY not in checkpoint:
        return False
    if payload_digest(checkpoint) != checkpoint[DIGEST_KEY]:
        raise CorruptCheckpointError(corrupt_message(path, "its contents differ from the SHA-256 digest stored "
                                                           "inside it when it was written"))
    return True


def verify_embedded_digest(path: str | Path) -> bool | None:
    """Load ``path`` (weights only) and check the digest stored inside it: ``True`` verified, ``False`` none stored,
    ``None`` not checked (a file a weights-only load refuses); raises :class:`CorruptCheckpointError` on a
    mismatch or an unreadable file."""
    import pickle

    try:
        checkpoint = safe_torch_load(path, "cpu", what="checkpoint")
    except ValueError as err:
        if isinstance(err.__cause__, pickle.UnpicklingError) and "Unsupported operand" not in str(err):
            return None
        raise CorruptCheckpointError(corrupt_message(path, f"truncated or unreadable: {err.__cause__ or err}")) from err
    return check_payload_digest(path, checkpoint)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(checkpoint: Mapping[str, Any], path: str | Path, keep_previous: bool = True,
                     check_finite: bool = True) -> Path:
    """Write ``checkpoint`` to ``path`` atomically with a recorded checksum (see the module docstring).

    Raises:
        NonFiniteCheckpointError: ``check_finite`` and the state dict holds NaN/inf (``path`` is left untouched).
    """
    path = Path(path)
    if check_finite:
        bad = non_finite_entries(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteCheckpointError(
                f"refusing to write {path}: the model state holds NaN or inf in {len(bad)} tensor(s) "
                f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); training has diverged. "
                f"{'The existing file keeps the last good state. ' if path.exists() else ''}Lower the learning rate "
                "(or enable gradient clipping) and resume from the last good checkpoint."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(checkpoint, Mapping):  # a copy without its .sha256 is verified by the digest inside
        checkpoint = {**checkpoint, DIGEST_KEY: payload_digest(checkpoint)}
    fd, tmp_name = mkstemp_like_open(path)  # the umask's permissions, not mkstemp's 0600
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        new_hash = sha256_file(tmp)
        old_hashes = recorded_hashes(path) if path.exists() else []
        _write_sidecar(path, [*old_hashes, new_hash])  # both versions are valid while the file is replaced
        if keep_previous and path.exists():
            _keep_previous(path, old_hashes)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _write_sidecar(path, [new_hash])
    except BaseException as err:
        full = disk_full_error(path, err) if isinstance(err, Exception) else None  # torch says "unexpected pos ..."
        with contextlib.suppress(OSError):
            tmp.unlink()
        if full is not None:
            raise full from err
        raise
    return path


def _keep_previous(path: Path, hashes: list[str]) -> None:
    previous = path.with_name(PREVIOUS_PREFIX + path.name)
    link = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.link(path, link)  # same inode: no copy
        os.replace(link, previous)
    except OSError:  # file systems without hard links: no previous version is kept
        with contextlib.suppress(OSError):
            link.unlink()
        return
    if hashes:
        _write_sidecar(previous, hashes)
    else:
        with contextlib.suppress(FileNotFoundError):
            checksum_path(previous).unlink()


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool | None = True,
                    check_finite: bool = True) -> dict[str, Any]:
    """Load a checkpoint after verifying its recorded checksum; ``weights_only=None`` means ``True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CorruptCheckpointError: checksum mismatch, truncated or unreadable file.
        NonFiniteCheckpointError: NaN or inf in the loaded ``state_dict``.
        ValueError: the file needs unpickling of other objects and ``weights_only`` is not ``False``.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sidecar = verify_checksum(path)
    try:
        checkpoint = safe_torch_load(path, map_location, allow_pickle=weights_only is False, what="checkpoint")
    except ValueError as err:
        cause = err.__cause__
        if isinstance(cause, pickle.UnpicklingError) and weights_only is not False:
            raise ValueError(
                f"checkpoint {path} holds objects that a weights-only load refuses ({str(cause).splitlines()[0]}). "
                "Loading it would unpickle arbitrary objects, which can run code; pass --weights_only false (Trainer: "
                "weights_only=False) only if you created or fully trust the file."
            ) from err
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}" if cause else str(err)
        raise CorruptCheckpointError(corrupt_message(path, f"truncated or unreadable: {reason}")) from err
    if not sidecar:
        check_payload_digest(path, checkpoint)  # a copy without its .sha256: the digest it carries
    if isinstance(checkpoint, dict):
        checkpoint.pop(DIGEST_KEY, None)
    if check_finite and isinstance(checkpoint, Mapping):
        bad = non_finite_entries(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteCheckpointError(corrupt_message(
                path, f"NaN or inf in {len(bad)} weight tensor(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
            ).replace("is corrupt", "holds non-finite weights", 1))
    return checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic writes, recorded checksums, a kept previous version and finite-weight checks
    (see the module docstring).

    Args:
        keep_previous: keep the previous version of an overwritten file as ``previous-<name>``.
        check_finite: refuse to write, and refuse to load, a state dict holding NaN or inf.
    """

    def __init__(self, keep_previous: bool = True, check_finite: bool = True) -> None:
        super().__init__()
        self.keep_previous, self.check_finite = keep_previous, check_finite

    @staticmethod
    def _is_local(path: Any) -> bool:
        return "://" not in str(path) or str(path).startswith("file://")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not self._is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote file systems: Lightning's own writer
            return
        write_checkpoint(checkpoint, str(path).removeprefix("file://"), self.keep_previous, self.check_finite)

    def load_checkpoint(self, path: Any, map_location: Callable | Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not self._is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(str(path).removeprefix("file://"), map_location, weights_only, self.check_finite)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if self._is_local(path):
            with contextlib.suppress(FileNotFoundError):
                checksum_path(str(path).removeprefix("file://")).unlink()


def install_safe_io(trainer: Any, **kwargs: Any) -> bool:
    """Replace the strategy's default ``TorchCheckpointIO`` with :class:`SafeCheckpointIO` (``True`` if done); custom
    plugins (a ``SafeCheckpointIO`` already, async or sharded IO) are left alone."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is not None and type(current) is not TorchCheckpointIO:
        return False
    if current is None and type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = SafeCheckpointIO(**kwargs)
    return True


__all__ = ["DIGEST_KEY", "CorruptCheckpointError", "NonFiniteCheckpointError", "SafeCheckpointIO", "checksum_path",
           "install_safe_io", "intact_alternatives", "non_finite_entries", "payload_digest", "read_checkpoint",
           "recorded_hashes", "verify_checksum", "verify_embedded_digest", "write_checkpoint"]
