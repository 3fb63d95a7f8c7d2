"""The JPEG input pipeline of the ImageNet-scale DataModules: crop parameters, decoding, resizing, batching.

Augmentation parameters are functions of seeds, never of the global RNG: the RandomResizedCrop box and the flip of a
training sample are drawn from ``(seed, epoch, base index)`` (:func:`sample_augmentation`), from the image size read out
of the JPEG header. So a sample gets the same crop whatever the batch, the worker, the rank, the path (decode in
workers or on the device) or a resume from a checkpoint.

Two paths produce the same training batches:

- in workers (``decode_on_device=False``): each worker decodes, crops, resizes and flips its samples to uint8
  ``(3, S, S)`` and the batch is normalized on the device;
- on the device (``decode_on_device=True``, the default on CUDA): workers only read the file bytes and draw the crop
  box and the flip; the batch carries the concatenated bytes (``"jpeg"``, kept on the host) with ``"jpeg_offsets"``,
  ``"box"`` and ``"flip"``, and :func:`decode_batch` decodes it with ``torchvision.io.decode_jpeg(device=...)``
  (nvJPEG on CUDA), crops and resizes each image in uint8 and flips it there; on a CPU "device" it decodes with the
  workers' functions in a pool of threads of the training process (no inter-process hand-over of decoded images).

Evaluation uses the standard resize of the shorter side to ``eval_resize`` (256) and a center crop of ``image_size``
(224).
"""

from __future__ import annotations

import functools
import io
import math
import mmap
import os
import platform
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from lightning_methods.datamodules.jpeg_region import decode_region

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class BadImageError(ValueError):
    """An image file that cannot be read (not a JPEG/PNG, truncated, corrupt)."""


# ---------------------------------------------------------------------------------------------------- JPEG header
def jpeg_header(data: bytes | memoryview, name: str = "<bytes>") -> tuple[int, int, int]:
    """``(height, width, components)`` from the start-of-frame marker of a JPEG stream, without decoding it.

    Raises:
        BadImageError: not a JPEG stream, or no frame header before the end of the data.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise BadImageError(f"{name}: not a JPEG file (no FFD8 start-of-image marker)")
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise BadImageError(f"{name}: corrupt JPEG (expected a marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF:
            if pos + 9 >= n:
                break
            h = (data[pos + 5] << 8) | data[pos + 6]
            w = (data[pos + 7] << 8) | data[pos + 8]
            if h == 0 or w == 0:
                raise BadImageError(f"{name}: corrupt JPEG (frame size {w}x{h})")
            return h, w, data[pos + 9]
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise BadImageError(f"{name}: corrupt or truncated JPEG (no frame header found)")


def to_rgb_jpeg(data: bytes, name: str = "<bytes>", quality: int = 95) -> bytes:
    """Re-encode an image that nvJPEG / the header reader cannot take (PNG saved as .JPEG, CMYK or grayscale JPEG)
    as a 3-channel JPEG. ImageNet's training set has a few such files."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=quality)
    except Exception as err:  # PIL raises many types for broken files
        raise BadImageError(f"{name}: cannot read the image ({type(err).__name__}: {err})") from err
    return out.getvalue()


def rgb_jpeg_bytes(data: bytes, name: str = "<bytes>") -> tuple[bytes, int, int]:
    """``(bytes, height, width)`` of a 3-component baseline/progressive JPEG: ``data`` itself when it is one,
    otherwise the image re-encoded by :func:`to_rgb_jpeg`."""
    if len(data) == 0:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    try:
        h, w, comps = jpeg_header(data, name)
        if comps == 3:
            return data, h, w
    except BadImageError:
        if data[:2] == b"\xff\xd8":  # a JPEG with a broken header: report it as such
            raise
    data = to_rgb_jpeg(data, name)
    h, w, _ = jpeg_header(data, name)
    return data, h, w


def _simplejpeg() -> Any:
    """The ``simplejpeg`` module, or ``None`` when it is not installed (it comes with the ``streaming`` extra)."""
    global _SIMPLEJPEG
    if _SIMPLEJPEG is None:
        try:
            import simplejpeg
        except ImportError:
            simplejpeg = False
        _SIMPLEJPEG = simplejpeg
    return _SIMPLEJPEG or None


_SIMPLEJPEG: Any = None


def decode_rgb(data: bytes | torch.Tensor, name: str = "<bytes>") -> torch.Tensor:
    """Decode JPEG/PNG bytes to uint8 ``(3, H, W)`` on the CPU (grayscale and CMYK converted to RGB).

    Color and grayscale JPEGs go through ``simplejpeg`` when it is installed (libjpeg-turbo like torchvision's and
    Pillow's decoders, with the same default settings, so the same pixels - tested - in 7% less time); CMYK JPEGs
    (whose conversion to RGB differs by one level between the two libraries), other formats and anything simplejpeg
    refuses go through ``torchvision.io.decode_image``. The result is a channels-last view ``(3, H, W)``, as
    torchvision's decoder returns it."""
    fast = _simplejpeg()
    if fast is not None and not isinstance(data, torch.Tensor) and bytes(data[:2]) == b"\xff\xd8":
        try:
            if jpeg_header(data, name)[2] in (1, 3):
                return torch.from_numpy(fast.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
        except (BadImageError, ValueError, RuntimeError):  # damaged or unusual: torchvision decides and names it
            pass
    if len(data) == 0:  # torch.frombuffer refuses an empty buffer with a message that names no file
        raise BadImageError(f"{name}: empty file (0 bytes)")
    t = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(t, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise BadImageError(f"{name}: cannot decode the image ({err})") from err


# ---------------------------------------------------------------------------------------------------- crop boxes
def crop_box(height: int, width: int, rng: random.Random, scale: Sequence[float] = SCALE,
             ratio: Sequence[float] = RATIO, attempts: int = ATTEMPTS) -> list[int]:
    """A RandomResizedCrop box ``[top, left, height, width]`` for an image of ``height x width``.

    The rule of Szegedy et al. (Inception, arXiv 1409.4842) as torchvision implements it: up to ``attempts`` draws of
    an area fraction ``U(scale)`` and a log-uniform aspect ratio ``w / h`` in ``ratio``; the first box that fits
    (``1 <= w <= W``, ``1 <= h <= H``, sides rounded) is placed uniformly; if none fits, the center crop of the whole
    image clamped to the ratio range. Plain Python floats: per-sample tensor ops would cost more than the decode."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < w <= width and 0 < h <= height:
            return [rng.randint(0, height - h), rng.randint(0, width - w), h, w]
    in_ratio = width / height
    w, h = width, height
    if in_ratio < ratio[0]:
        h = min(height, round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w = min(width, round(height * ratio[1]))
    return [(height - h) // 2, (width - w) // 2, h, w]


def sample_augmentation(seed: int, epoch: int, index: int, height: int, width: int, flip: bool = True,
                        scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO) -> tuple[list[int], bool]:
    """The crop box and the flip of one training sample, drawn from ``(seed, epoch, index)`` only (Python's
    Mersenne Twister seeded through SHA-512 of the three integers: a few microseconds, the same in every process)."""
    rng = random.Random(f"{int(seed)}/{int(epoch)}/{int(index)}")
    box = crop_box(height, width, rng, scale, ratio)
    return box, (rng.random() < 0.5) if flip else False


# ---------------------------------------------------------------------------------------------------- transforms
@functools.cache
def _native_uint8_resize() -> bool:
    """Whether torchvision resizes uint8 images with torch's uint8 kernel on this CPU (elsewhere it converts to
    float32 and rounds back, other pixels). Its own rule where it has one: the rule changed between releases
    (torchvision 0.21 on an AVX512 CPU converts, 0.29 does not); otherwise 0.29's: AVX2, AVX512 or ARM."""
    try:
        from torchvision.transforms.v2.functional._geometry import _do_native_uint8_resize_on_cpu
    except ImportError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64",
                                                                                                       "arm64")
    return bool(_do_native_uint8_resize_on_cpu(TF.InterpolationMode.BILINEAR))


def resize_uint8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a uint8 ``(3, H, W)`` image (any strides) to ``height x width``, bilinear and antialiased, with the
    pixels of torchvision's ``resize``. On the CPU it calls the uint8 kernel torchvision uses directly on the
    decoder's output, a channels-last view: torchvision's wrapper first copies such a view into a contiguous
    ``(3, H, W)`` tensor, which the kernel then converts back to channels-last (0.42 instead of 0.26 ms per 224 px
    crop on one thread). Elsewhere (CUDA, or where torchvision converts to float32) it is torchvision's ``resize``."""
    if image.device.type == "cpu" and _native_uint8_resize():
        return torch.nn.functional.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                                               align_corners=False)[0]
    return TF.resize(image, [height, width], antialias=True)


def decode_crop(data: bytes | memoryview, box: Sequence[int], name: str = "<bytes>") -> torch.Tensor:
    """The pixels ``box`` = ``(top, left, h, w)`` of an encoded image as uint8 ``(3, h, w)``: only that region is
    decoded where a TurboJPEG 3 library is available (:func:`~lightning_methods.datamodules.jpeg_region.decode_region`,
    the same pixels in about three quarters of the time), otherwise the whole image (:func:`decode_rgb`) is cut."""
    region = decode_region(data, box)
    if region is not None:
        return region
    top, left, h, w = (int(v) for v in box)
    return decode_rgb(data, name)[:, top : top + h, left : left + w]


def crop_resize(image: torch.Tensor, box: Sequence[int], size: int) -> torch.Tensor:
    """Cut ``box`` = ``(top, left, h, w)`` out of a uint8 ``(3, H, W)`` image and resize it to ``size x size``
    (bilinear, antialiased), staying uint8: torchvision's ``resized_crop``, pixel for pixel."""
    top, left, h, w = (int(v) for v in box)
    return resize_uint8(image[:, top : top + h, left : left + w], size, size)


def eval_resize_crop(image: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """The evaluation transform: resize the shorter side to ``resize`` (antialiased; the longer side to
    ``int(resize * long / short)``, torchvision's rule), center crop ``size``; uint8."""
    h, w = image.shape[-2:]
    if min(h, w) == resize:  # torchvision returns the image unchanged
        pass
    elif h <= w:
        image = resize_uint8(image, resize, int(resize * w / h))
    else:
        image = resize_uint8(image, int(resize * h / w), resize)
    return TF.center_crop(image, [size, size])


def train_image(data: bytes, seed: int, epoch: int, index: int, size: int, flip: bool = True,
                scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO, name: str = "<bytes>"
                ) -> torch.Tensor:
    """One training sample decoded in a worker: RandomResizedCrop to ``size`` and flip, uint8 ``(3, size, size)``."""
    data, h, w = rgb_jpeg_bytes(data, name)
    box, flipped = sample_augmentation(seed, epoch, index, height=h, width=w, flip=flip, scale=scale, ratio=ratio)
    image = resize_uint8(decode_crop(data, box, name), size, size)
    return image.flip(-1) if flipped else image


def pack_jpegs(items: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate encoded images into one uint8 tensor plus ``N + 1`` offsets (one shared-memory block per batch
    instead of one per image)."""
    offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in items], dtype=torch.int64), 0)
    flat = torch.frombuffer(bytearray(b"".join(items)), dtype=torch.uint8) if offsets[-1] > 0 else \
        torch.empty(0, dtype=torch.uint8)
    return flat, offsets


def unpack_jpegs(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The per-image byte tensors of :func:`pack_jpegs` (views, on the CPU)."""
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def decode_batch(batch: dict[str, Any], size: int, device: torch.device | str,
                 eval_resize: int | None = None, threads: int = 1,
                 name_of: Callable[[int], str] | None = None) -> torch.Tensor:
    """Decode a batch of packed JPEG bytes on ``device`` and crop it: training batches (with ``"box"`` /
    ``"flip"``) get their RandomResizedCrop + flip, evaluation batches the resize / center crop. uint8 ``(N, 3, size,
    size)`` on ``device``.

    On CUDA the images are decoded together by nvJPEG. On the CPU each image is decoded and cropped by the workers'
    own functions (:func:`decode_rgb`, :func:`crop_resize`, :func:`eval_resize_crop`: the same pixels as the worker
    path), by ``threads`` threads of this process: the decoder and the resize release the GIL, so the batch scales
    with the threads without the inter-process hand-over of worker processes.

    ``name_of(i)`` names the ``i``-th image (its file) in the error of an image that cannot be decoded (default:
    ``batch image i``), called only then; nvJPEG names none, so where the batched decode fails each image is decoded
    on the CPU to find the culprit."""
    name_of = name_of or (lambda i: f"batch image {i}")
    data = unpack_jpegs(batch["jpeg"], batch["jpeg_offsets"])
    if not data:
        return torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
    boxes = flips = None
    if "box" in batch:
        boxes = batch["box"].tolist() if isinstance(batch["box"], torch.Tensor) else batch["box"]
        flips = batch["flip"].tolist() if isinstance(batch["flip"], torch.Tensor) else batch["flip"]
    if torch.device(device).type == "cpu":

        def one(i: int) -> torch.Tensor:
            encoded, name = memoryview(data[i].numpy()), f"batch image {i}"
            try:
                if boxes is None:
                    return eval_resize_crop(decode_rgb(encoded, name), eval_resize or size, size)
                out = resize_uint8(decode_crop(encoded, boxes[i], name), size, size)
                return out.flip(-1) if flips[i] else out
            except BadImageError as err:
                failure = err
            # the error again, naming the file (looked up only now), raised outside the handler so that it is not
            # chained to the unnamed one (the command line reports the innermost error of the package in a chain)
            decode_rgb(encoded, name_of(i))
            raise failure

        if threads > 1 and len(data) > 1:
            with ThreadPoolExecutor(max_workers=min(threads, len(data))) as pool:
                return torch.stack(list(pool.map(one, range(len(data)))))
        return torch.stack([one(i) for i in range(len(data))])
    try:
        return decode_together(data, size, device, boxes, flips, eval_resize)
    except RuntimeError:
        for i, encoded in enumerate(data):  # the first image the CPU decoder refuses, named (BadImageError)
            decode_rgb(memoryview(encoded.numpy()), name_of(i))
        raise


def decode_together(data: list[torch.Tensor], size: int, device: torch.device | str,
                    boxes: Sequence[Sequence[int]] | None = None, flips: Sequence[bool] | None = None,
                    eval_resize: int | None = None) -> torch.Tensor:
    """Decode the encoded images ``data`` in one ``torchvision.io.decode_jpeg`` call on ``device`` and crop them:
    with ``boxes`` and ``flips`` the training crop and flip, otherwise the evaluation resize / center crop; uint8
    ``(N, 3, size, size)``. :func:`decode_batch` does this on CUDA (nvJPEG). On the CPU torchvision's decoder gives
    the per-image path's pixels (tested), so everything but the decoder is checked without a GPU."""
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    if boxes is None:
        return torch.stack([eval_resize_crop(img, eval_resize or size, size) for img in images])
    out = torch.stack([crop_resize(img, box, size) for img, box in zip(images, boxes)])
    flip = torch.tensor([bool(f) for f in flips], device=out.device).view(-1, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)


class _ReusedBatchMemory:
    """Float32 batch memory that :func:`normalize_uint8` reuses on the CPU once nothing refers to it any more.

    With DataLoader workers a uint8 batch arrives in fresh shared memory, and the small allocations made while it is
    received split the block the previous float batch left free, so the C heap seldom hands that block back: each
    batch's float output then came from fresh pages (4,780 page faults for 32 x 224 px images, 0.15-0.3 ms per image,
    twice the conversion itself; issue 23). A buffer is reused only while its storage has no other holder - no
    tensor, view, detached copy, NumPy array or autograd record of an earlier output - so a batch that is still alive
    is never written over. The buffers are anonymous shared mappings (no file descriptor): private memory becomes
    copy-on-write when the DataLoader forks its workers at each epoch's start, and the first write to each page then
    faulted again (about 4,700 faults, 10 ms of CPU per epoch); a forked child starts with no buffers of its own.
    Only on the CPU (CUDA's caching allocator already reuses memory), and only where torch exposes a storage's use
    count (otherwise each call allocates, as before)."""

    def __init__(self, per_shape: int = 2, shapes: int = 4) -> None:
        self.per_shape, self.shapes = per_shape, shapes
        self.use_count = getattr(torch._C, "_storage_Use_Count", None)
        self.forget()
        if hasattr(os, "register_at_fork"):  # a forked worker must not write into its parent's shared buffers
            os.register_at_fork(after_in_child=self.forget)

    def forget(self) -> None:
        """Drop every buffer (and take a fresh lock, in case a thread held it when the process forked)."""
        self.buffers: dict[tuple[int, ...], list[torch.UntypedStorage]] = {}
        self.lock = threading.Lock()

    @staticmethod
    def allocate(nbytes: int) -> torch.UntypedStorage:
        """``nbytes`` of memory that a fork shares instead of copying on write, without a file descriptor."""
        try:
            return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).untyped_storage()
        except (OSError, ValueError, TypeError):  # an empty shape, or a platform without anonymous shared mappings
            return torch.UntypedStorage(nbytes)

    def take(self, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised contiguous float32 CPU tensor of ``shape``, on reused memory when a buffer is free."""
        shape = tuple(int(v) for v in shape)
        if self.use_count is None:
            return torch.empty(shape, dtype=torch.float32)
        with self.lock:
            buffers = self.buffers.setdefault(shape, [])
            storage = next((s for s in buffers if self.use_count(s._cdata) == 1), None)
            if storage is None:
                storage = self.allocate(math.prod(shape) * 4)
                buffers.append(storage)
                del buffers[: -self.per_shape]  # the oldest buffers are let go (batches still alive keep theirs)
                for key in list(self.buffers)[: -self.shapes]:
                    del self.buffers[key]
            return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


_BATCH_MEMORY = _ReusedBatchMemory()


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std`` as ``x * (1 / (255 std)) - mean / std``: the
    conversion, then an in-place multiply and add, equal to the straightforward expression up to float32 rounding.
    (On the CPU, ``torch.addcmul`` with per-channel broadcast operands took 8x as long as the two in-place passes,
    0.63 vs 0.08 ms per 224 px image on one thread: it was the largest cost after decoding; issue 23.) A contiguous
    CPU batch is converted into reused memory (:class:`_ReusedBatchMemory`)."""
    scale = torch.tensor([1.0 / (255.0 * v) for v in std], device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    bias = torch.tensor([-m / v for m, v in zip(mean, std)], device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    if x.device.type == "cpu" and x.is_contiguous() and not x.requires_grad:
        return _BATCH_MEMORY.take(x.shape).copy_(x).mul_(scale).add_(bias)
    return x.float().mul_(scale).add_(bias)
