"""Decode only the region of a JPEG that a RandomResizedCrop keeps, through TurboJPEG 3's cropping region.

libjpeg-turbo 3 (``tj3SetCroppingRegion`` + ``tj3Decompress8``) skips the color conversion, upsampling and inverse DCT
of the rows above and the columns beside a region, and stops after its last row. With one iMCU (8-32 px) of margin on
the left and the right, which the chroma upsampler reads at a region's edges, the region's pixels are those of a full
decode (same library, same default settings as simplejpeg's and torchvision's decoders; tested on 4:2:0, 4:2:2,
4:4:4, grayscale, progressive and restart-marker files, crops at every edge). A training crop then decodes in about
three quarters of the time (0.56 instead of 0.73 ms per ImageNet-sized photograph; docs/imagenet.md section 6).

No maintained Python binding exposes the cropping region, so the library is called through ``ctypes`` (the calls
release the GIL). It is looked up once per process, first found wins:

1. the path in ``LIGHTNING_METHODS_TURBOJPEG`` (``off`` turns region decoding off);
2. a system ``libturbojpeg`` of version 3 or later (conda-forge / Homebrew ``libjpeg-turbo`` 3.x);
3. the copy bundled in the ``turbojpeg`` wheel (the ``streaming`` extra installs it where a wheel exists: Linux
   x86-64, macOS, Windows; Python 3.10-3.13).

Without a library, :func:`decode_region` returns ``None`` and the caller decodes the whole image (the same pixels).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import os
import threading

import numpy as np
import torch

ENV = "LIGHTNING_METHODS_TURBOJPEG"
_INIT_DECOMPRESS, _PARAM_SUBSAMP, _PARAM_WIDTH, _PARAM_HEIGHT, _PF_RGB = 1, 4, 5, 6, 0
_IMCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)  # per TJSAMP: 444, 422, 420, gray, 440, 411, 441


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the signatures of the TurboJPEG 3 functions used here (AttributeError when ``lib`` lacks one)."""
    handle = buf = ctypes.c_void_p
    lib.tj3Init.restype, lib.tj3Init.argtypes = handle, [ctypes.c_int]
    lib.tj3Destroy.restype, lib.tj3Destroy.argtypes = None, [handle]
    lib.tj3DecompressHeader.argtypes = [handle, buf, ctypes.c_size_t]
    lib.tj3Get.argtypes = [handle, ctypes.c_int]
    lib.tj3SetCroppingRegion.argtypes = [handle, _Region]
    lib.tj3Decompress8.argtypes = [handle, buf, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return lib


def _load(path: str) -> ctypes.CDLL | None:
    try:
        return _bind(ctypes.CDLL(path))
    except (OSError, AttributeError):  # not a shared library, or a TurboJPEG older than 3.0
        return None


def _wheel_candidates() -> list[str]:
    """Shared libraries shipped in the ``turbojpeg`` wheel's files (``libturbojpeg*`` first)."""
    try:
        files = importlib.metadata.distribution("turbojpeg").files or []
    except importlib.metadata.PackageNotFoundError:
        return []
    found = [str(f.locate()) for f in files if "turbojpeg" in f.name.lower()
             and any(part in f.name for part in (".so", ".dylib", ".dll", ".pyd"))]
    return sorted(found, key=lambda p: "libturbojpeg" not in os.path.basename(p).lower())


@functools.cache
def library() -> ctypes.CDLL | None:
    """The TurboJPEG 3 library of this process, or ``None`` (see the module docstring for the lookup).

    Raises:
        OSError: ``LIGHTNING_METHODS_TURBOJPEG`` names a file that is not a TurboJPEG 3 library.
    """
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in ("off", "0", "false", "no"):
        return None
    if choice:
        lib = _load(choice)
        if lib is None:
            raise OSError(f"{ENV}={choice}: not a TurboJPEG 3 shared library (libturbojpeg of libjpeg-turbo >= 3.0, "
                          f"exporting tj3SetCroppingRegion); point it at one, or set {ENV}=off to decode whole images")
        return lib
    system = ctypes.util.find_library("turbojpeg")
    for path in ([system] if system else []) + _wheel_candidates():
        lib = _load(path)
        if lib is not None:
            return lib
    return None


class _Decompressor:
    """A TurboJPEG decompression handle, destroyed with this object (when its thread ends: the CPU batch decode runs
    a fresh pool of threads per batch, so handles must not outlive them)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib, self.handle = lib, lib.tj3Init(_INIT_DECOMPRESS)

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self.lib.tj3Destroy(self.handle)
            self.handle = None


class _Handles(threading.local):
    """One decompressor per thread (a TurboJPEG handle must not be shared between threads); a forked child makes its
    own on first use."""

    decompressor: _Decompressor | None = None


_HANDLES = _Handles()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: setattr(_HANDLES, "decompressor", None))


def decode_region(data: bytes | memoryview, box: list[int] | tuple[int, ...]) -> torch.Tensor | None:
    """The pixels ``box`` = ``(top, left, height, width)`` of a JPEG as uint8 ``(3, height, width)`` (a view of a
    ``(height, width', 3)`` array, like the crop of a full decode), decoding only that region plus its margin.

    Returns ``None`` when no TurboJPEG 3 library is available, the data does not end with the end-of-image marker
    (truncated, or bytes after the image) or the library refuses it (damaged or unusual files, CMYK): the caller then
    decodes the whole image, whose decoder names the problem. Damage to the entropy-coded data below or beside the
    region goes unnoticed (that data is not decoded); ``prepare-data convert`` decodes every image in full first."""
    lib = library()
    if lib is None:
        return None
    if _HANDLES.decompressor is None or _HANDLES.decompressor.lib is not lib:
        _HANDLES.decompressor = _Decompressor(lib)
    handle = _HANDLES.decompressor.handle
    if not handle:
        return None
    if len(data) < 4 or bytes(data[-2:]) != b"\xff\xd9":  # a truncated file: the whole-image decoder refuses it
        return None
    src = np.frombuffer(data, dtype=np.uint8)  # no copy of bytes or of a memoryview
    buf, size = src.ctypes.data, src.size
    if lib.tj3DecompressHeader(handle, buf, size) != 0:
        return None
    width, subsamp = lib.tj3Get(handle, _PARAM_WIDTH), lib.tj3Get(handle, _PARAM_SUBSAMP)
    top, left, h, w = (int(v) for v in box)
    if not (0 <= subsamp < len(_IMCU_WIDTH)) or h <= 0 or w <= 0 or top < 0 or left < 0 or left + w > width \
            or top + h > lib.tj3Get(handle, _PARAM_HEIGHT):
        return None
    step = _IMCU_WIDTH[subsamp]
    x0 = max(0, (left // step - 1) * step)  # the region's left edge must sit on an iMCU boundary
    x1 = min(width, left + w + step)
    out = np.empty((h, x1 - x0, 3), dtype=np.uint8)
    if lib.tj3SetCroppingRegion(handle, _Region(x0, top, x1 - x0, h)) != 0:
        return None
    ok = lib.tj3Decompress8(handle, buf, size, out.ctypes.data, 0, _PF_RGB) == 0
    lib.tj3SetCroppingRegion(handle, _Region(0, 0, 0, 0))  # the next image of this handle starts uncropped
    if not ok:  # errors and warnings (a truncated file): the whole-image decoder decides and names the file
        return None
    return torch.from_numpy(out).permute(2, 0, 1)[:, :, left - x0 : left - x0 + w]
