"""Region decoding (TurboJPEG 3's cropping region, datamodules/jpeg_region.py): the pixels of a full decode, on every
chroma subsampling, progressive and restart-marker files, crops at every edge; the fall-backs (no library, damaged
files), the library lookup, threads and forked workers."""

from __future__ import annotations

import io
import multiprocessing
import platform
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_methods.datamodules import jpeg_region
from lightning_methods.datamodules.jpeg_pipeline import (
    BadImageError,
    crop_box,
    decode_batch,
    decode_crop,
    decode_rgb,
    pack_jpegs,
    sample_augmentation,
    train_image,
)
from lightning_methods.datamodules.jpeg_region import decode_region

# where pyproject.toml's streaming extra installs the turbojpeg wheel (its bundled libturbojpeg 3)
WHEEL_PLATFORM = sys.version_info < (3, 14) and (
    (platform.system() == "Linux" and platform.machine() == "x86_64") or platform.system() in ("Darwin", "Windows"))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[0]  # 427 x 640, real chroma detail (a subsampling error shows)


def encode(array: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format="JPEG", **options)
    return out.getvalue()


@pytest.fixture
def lib():
    if jpeg_region.library() is None:
        if WHEEL_PLATFORM:
            pytest.fail("no TurboJPEG 3 library found: the streaming extra installs the turbojpeg wheel here")
        pytest.skip("no TurboJPEG 3 library on this platform (whole images are decoded instead)")
    return jpeg_region.library()


def boxes(height: int, width: int, rng: random.Random) -> list[list[int]]:
    """RandomResizedCrop boxes plus the whole image and 1- to 7-pixel boxes in each corner and at the middle."""
    out = [crop_box(height, width, rng) for _ in range(6)] + [[0, 0, height, width]]
    for h, w in ((1, 1), (5, 7)):
        out += [[0, 0, h, w], [0, width - w, h, w], [height - h, 0, h, w], [height - h, width - w, h, w],
                [height // 2, width // 2 - w // 2, h, w]]
    return out


@pytest.mark.parametrize("kind", ["420", "422", "444", "gray", "progressive", "restart", "q100"])
def test_region_pixels_equal_a_full_decode(kind, photo, lib):
    """Exact equality, including the columns at the region's edges where a region without its one-iMCU margin
    differs (the chroma upsampler reads a neighbouring column: about a fifth of crops differ without it)."""
    options = {"420": {"subsampling": 2}, "422": {"subsampling": 1}, "444": {"subsampling": 0},
               "gray": {}, "progressive": {"subsampling": 2, "progressive": True},
               "restart": {"subsampling": 2, "restart_marker_blocks": 3}, "q100": {"quality": 100}}[kind]
    rng = random.Random(kind)
    for _ in range(6):
        h, w = rng.randint(9, photo.shape[0]), rng.randint(9, photo.shape[1])  # sizes off the MCU grid too
        image = photo[:h, :w, 0] if kind == "gray" else photo[:h, :w]
        data = encode(image, **options)
        full = decode_rgb(data)
        for top, left, bh, bw in boxes(h, w, rng):
            region = decode_region(data, [top, left, bh, bw])
            assert region is not None and region.shape == (3, bh, bw) and region.dtype == torch.uint8
            assert torch.equal(region, full[:, top : top + bh, left : left + bw]), (kind, (h, w), (top, left, bh, bw))


def test_train_image_and_cpu_batch_decode_equal_the_whole_image_path(photo, lib, monkeypatch):
    """The training sample of the worker path and of the threaded batch decode are the same with and without region
    decoding (index-drawn crops and flips on a 4:2:0 photo)."""
    data = encode(photo[7:400, 3:611], quality=90)
    kw = {"seed": 3, "epoch": 1, "size": 32}
    boxes_, flips = zip(*(sample_augmentation(3, 1, i, 393, 608) for i in range(12)))
    batch = dict(zip(("jpeg", "jpeg_offsets"), pack_jpegs([data] * 12)), box=torch.tensor(boxes_),
                 flip=torch.tensor(flips))
    fast = [train_image(data, index=i, **kw) for i in range(12)], decode_batch(batch, 32, "cpu", threads=3)
    monkeypatch.setattr(jpeg_region, "library", lambda: None)
    assert decode_region(data, [0, 0, 8, 8]) is None
    slow = [train_image(data, index=i, **kw) for i in range(12)], decode_batch(batch, 32, "cpu", threads=3)
    assert all(torch.equal(a, b) for a, b in zip(fast[0], slow[0]))
    assert torch.equal(fast[1], slow[1]) and torch.equal(fast[1], torch.stack(fast[0]))


def test_damaged_or_foreign_data_falls_back_to_the_whole_image_decoder(photo, lib):
    """Truncated files, garbage, bytes after the image and non-JPEG data are left to the whole-image decoder, which
    names the file; a region of an intact image decodes."""
    data = encode(photo[:200, :300])
    assert decode_region(data, [0, 0, 40, 40]) is not None
    truncated = data[: len(data) // 2]  # the first rows would decode: the missing end-of-image marker sends it back
    for bad in (truncated, data[:600] + bytes(range(256)) * 20, b"", b"\xff\xd9", b"not a jpeg\xff\xd9"):
        assert decode_region(bad, [0, 0, 40, 40]) is None
    with pytest.raises(BadImageError, match="photo.JPEG: cannot decode the image"):
        decode_crop(truncated, [0, 0, 40, 40], "photo.JPEG")
    trailing = data + b"\x00trailer"  # intact image, then bytes: decoded whole, the same pixels
    assert decode_region(trailing, [5, 9, 30, 40]) is None
    assert torch.equal(decode_crop(trailing, [5, 9, 30, 40]), decode_rgb(data)[:, 5:35, 9:49])
    for outside in ([0, 0, 201, 10], [0, 290, 10, 11], [-1, 0, 5, 5], [0, 0, 0, 5]):  # not inside the image
        assert decode_region(data, outside) is None


def test_threads_and_a_forked_child_decode_with_their_own_handles(photo, lib):
    data = encode(photo[:300, :400])
    rng = random.Random(5)
    crops = [crop_box(300, 400, rng) for _ in range(32)]
    expect = [decode_region(data, box) for box in crops]  # this thread's handle exists before the fork below
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda box: decode_region(data, box), crops))
    assert all(torch.equal(a, b) for a, b in zip(expect, got))
    if "fork" not in multiprocessing.get_all_start_methods():
        return
    with multiprocessing.get_context("fork").Pool(1) as pool:
        had_handle, child = pool.apply_async(_decode_in_child, (data, crops[0])).get(timeout=60)
    assert not had_handle  # reset at the fork: the child made its own
    assert np.array_equal(child, expect[0].numpy())


def test_a_threads_handle_is_destroyed_when_the_thread_ends(photo, lib, monkeypatch):
    """The CPU batch decode starts a fresh pool of threads per batch: each thread's handle is destroyed with it, so
    handles do not pile up over an epoch."""
    data = encode(photo[:120, :160])
    made, destroyed, init, destroy = [], [], lib.tj3Init, lib.tj3Destroy
    monkeypatch.setattr(lib, "tj3Init", lambda kind: made.append(init(kind)) or made[-1])
    monkeypatch.setattr(lib, "tj3Destroy", lambda handle: destroyed.append(handle) or destroy(handle))
    monkeypatch.setattr(jpeg_region._HANDLES, "decompressor", None)  # this thread's next handle is counted too
    batch = dict(zip(("jpeg", "jpeg_offsets"), pack_jpegs([data] * 6)), box=torch.tensor([[10, 20, 50, 60]] * 6),
                 flip=torch.zeros(6, dtype=torch.bool))
    for _ in range(5):
        decode_batch(batch, 16, "cpu", threads=3)
    assert len(made) >= 5  # new threads each batch, each with a handle of its own
    assert len(destroyed) == len(made)  # every one gone with its thread (this thread decoded nothing)


def _decode_in_child(data: bytes, box: list[int]) -> tuple[bool, np.ndarray]:
    """NumPy only in the child (a torch op that starts OpenMP threads after a fork can hang, as in DataLoader workers
    that do not limit their threads)."""
    had_handle = jpeg_region._HANDLES.decompressor is not None
    return had_handle, np.ascontiguousarray(decode_region(data, box).numpy())


@pytest.fixture
def fresh_lookup():
    jpeg_region.library.cache_clear()
    yield
    jpeg_region.library.cache_clear()


def test_library_lookup_environment_variable(fresh_lookup, tmp_path, monkeypatch, lib):
    """``off`` turns region decoding off; a path names the library to use; a file that is not a TurboJPEG 3 library
    stops with a message naming it and the variable."""
    monkeypatch.setenv(jpeg_region.ENV, "off")
    jpeg_region.library.cache_clear()
    assert jpeg_region.library() is None
    jpeg_region.library.cache_clear()
    monkeypatch.setenv(jpeg_region.ENV, lib._name)
    assert jpeg_region.library()._name == lib._name
    jpeg_region.library.cache_clear()
    bogus = tmp_path / "libturbojpeg.so"
    bogus.write_text("not a library")
    monkeypatch.setenv(jpeg_region.ENV, str(bogus))
    with pytest.raises(OSError, match=rf"LIGHTNING_METHODS_TURBOJPEG={bogus}: not a TurboJPEG 3 shared library.*=off"):
        jpeg_region.library()
