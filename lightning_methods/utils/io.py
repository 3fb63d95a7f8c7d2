"""Crash-safe writes and code-free loads.

Every file the package writes for later reuse (checkpoint-like state, selections, caches, JSON state) goes through an
atomic write: the bytes go to a temporary file in the same directory, are flushed to disk, and replace the target with
``os.replace``, so a kill or a full disk leaves either the old file or the new one, never a truncated one.

Every file the package loads with ``torch.load`` goes through :func:`safe_torch_load` (``weights_only=True``): a file
from elsewhere can never run code while it is loaded. Unpickling arbitrary objects needs the explicit
``allow_pickle=True`` opt-in, which warns.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class DiskFullError(OSError):
    """A write failed because the file system is full (``errno.ENOSPC``); the message names the file."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it by setting it (and set it straight back)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file (``0o666 & ~umask``): ``mkstemp`` makes 0600 files, which
    colleagues sharing a results folder could not read."""
    return 0o666 & ~current_umask()


def mkstemp_like_open(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` (for an atomic write) with the permissions a plain ``open()`` would give."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with contextlib.suppress(OSError):
        os.fchmod(fd, new_file_mode())
    return fd, tmp


def _free_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def disk_full_error(path: str | Path, err: BaseException) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path`` when ``err`` (raised while writing it) came from a full file system,
    else ``None``. torch reports a full disk as a ``RuntimeError`` ("unexpected pos ...", "file write failed"), so
    an error of another kind counts when the file system has (almost) no space left. Call it while the partly
    written temporary file still exists (it holds the space that ran out)."""
    path = Path(path)
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if not full and isinstance(err, (OSError, RuntimeError)):
        free = _free_bytes(path.parent)
        full = free is not None and free < (1 << 20)
    if not full:
        return None
    free = _free_bytes(path.parent)
    left = f" ({free} bytes free on its file system)" if free is not None else ""
    error = DiskFullError(f"no space left on device while writing {path}{left}; the previous version of the file (if "
                          "any) is intact. Free some space (or choose another directory) and rerun; a fit resumes "
                          "from its last.ckpt")
    error.errno, error.filename = errno.ENOSPC, str(path)
    return error


def _atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_like_open(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = disk_full_error(path, err) if isinstance(err, Exception) else None
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full is not None:
            raise full from err
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring)."""
    return _atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; non-JSON values (paths, numpy scalars) become strings/floats."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        return value.item()  # numpy / torch scalars
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    return str(value)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` atomically."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_numpy(array: Any, path: str | Path) -> Path:
    """``numpy.save(path, array)`` atomically (the file name is used as given; no ``.npy`` is appended)."""
    import numpy as np

    return _atomic_write(path, lambda f: np.save(f, np.asarray(array)))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def numpy_safe_globals() -> list[Any]:
    """The numpy reconstructors a weights-only load may accept for files holding numpy arrays and scalars (e.g. the
    CIFAR-N label files): they rebuild arrays from raw bytes and run no other code. Names written by numpy 1
    (``numpy.core``) and numpy 2 (``numpy._core``) are both listed."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    out: list[Any] = [np.ndarray, np.dtype, reconstruct, scalar,
                      (reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar"),
                      (reconstruct, "numpy._core.multiarray._reconstruct"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


def safe_torch_load(path: str | Path, map_location: Any = "cpu", allow_pickle: bool = False, what: str = "file",
                    allow_numpy: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``; errors name the file and say what to do.

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        allow_pickle: explicit opt-in to unpickle arbitrary objects (``weights_only=False``). Only for files you
            created yourself or fully trust: unpickling can run arbitrary code. Warns when used.
        what: a short description of the file for error messages ("teacher checkpoint", "feature cache", ...).
        allow_numpy: also accept numpy arrays and scalars (:func:`numpy_safe_globals`), still without running code.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is truncated or not a torch file, or it holds objects that need unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if allow_pickle:
        warnings.warn(f"loading {what} {path} with weights_only=False (allow_pickle=True): unpickling can run "
                      "arbitrary code; use this only for files you created or fully trust", stacklevel=2)
    try:
        if allow_numpy and not allow_pickle:
            with torch.serialization.safe_globals(numpy_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if allow_pickle:
            raise ValueError(f"{what} {path} could not be read: {err}") from err
        if "Unsupported operand" in str(err):  # bytes that are not a pickle at all, not a refused object
            raise ValueError(f"{what} {path} is truncated or not a torch file ({str(err).splitlines()[0]} ... "
                             "Unsupported operand); re-create or re-download it") from err
        raise ValueError(
            f"{what} {path} holds objects that a weights-only load refuses ({str(err).splitlines()[0]}). A file that "
            "needs unpickling can run code while it loads; re-save it as plain tensors/containers, or opt in "
            "explicitly (allow_pickle=True) if you created it yourself."
        ) from err
    except (EOFError, RuntimeError, OSError, IndexError, KeyError, TypeError, ValueError, AttributeError) as err:
        # garbage bytes surface as any of these from the zip reader or the legacy unpickler
        raise ValueError(f"{what} {path} is truncated or not a torch file ({type(err).__name__}: {err}); "
                         "re-create or re-download it") from err
