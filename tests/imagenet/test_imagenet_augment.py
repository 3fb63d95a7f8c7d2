"""The JPEG pipeline: header sizes, RandomResizedCrop boxes (inside the image, within the scale / ratio ranges),
flips, decoding on the device vs in workers, re-encoding of files nvJPEG cannot take."""

from __future__ import annotations

import io
import math
import os
import random

import numpy as np
import pytest
import torch
from imagenet_tiny_tree import jpeg_bytes, write_imagenet_tree
from PIL import Image

from lightning_methods.datamodules import ImageNetDataModule
from lightning_methods.datamodules.jpeg_pipeline import (
    RATIO,
    SCALE,
    BadImageError,
    crop_box,
    crop_resize,
    decode_batch,
    decode_rgb,
    decode_together,
    jpeg_header,
    normalize_uint8,
    rgb_jpeg_bytes,
    sample_augmentation,
    train_image,
    unpack_jpegs,
)


def test_header_size_matches_pil():
    rng = np.random.default_rng(0)
    for h, w in [(17, 31), (40, 48), (300, 7)]:
        data = jpeg_bytes(rng, 1, (h, w))
        assert jpeg_header(data)[:2] == (h, w) == Image.open(io.BytesIO(data)).size[::-1]
    with pytest.raises(BadImageError, match="img.bin: not a JPEG"):
        jpeg_header(b"GIF89a....", "img.bin")


def test_png_cmyk_and_gray_files_are_reencoded_as_rgb_jpeg():
    arr = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    for mode, fmt in [("RGB", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG")]:
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format=fmt)
        data, h, w = rgb_jpeg_bytes(buf.getvalue(), "x")
        assert (h, w) == (20, 30) and jpeg_header(data)[2] == 3
        assert decode_rgb(data).shape == (3, 20, 30)


def _boxes(sizes: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return torch.tensor([crop_box(int(h), int(w), rng) for h, w in sizes.tolist()])


def test_crop_boxes_inside_and_within_ranges():
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    sizes = torch.randint(1, 600, (4000, 2), generator=gen)
    top, left, h, w = _boxes(sizes, rng).unbind(1)
    H, W = sizes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    # images whose own aspect ratio is inside the range: ten failed draws are unlikely (< 0.5 ** 10 per image), and
    # the fallback would be the whole image, which is excluded below
    H = torch.randint(16, 600, (4000,), generator=gen)
    W = (H * (0.8 + 0.45 * torch.rand(4000, generator=gen))).round().long()
    top, left, h, w = _boxes(torch.stack([H, W], 1), rng).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    # area fraction and aspect ratio within the ranges, up to the rounding of each side to an integer (a side s is off
    # by at most 1/2, so w / h and w * h move by at most those factors)
    full = (h == H) & (w == W)
    area = (h * w).double() / (H * W).double()
    ratio = w.double() / h.double()
    ok = ~full & (h >= 8) & (w >= 8)
    eps_w, eps_h = 0.5 / w.double(), 0.5 / h.double()
    assert (area[ok] >= SCALE[0] * (1 - eps_w[ok]) * (1 - eps_h[ok])).all()
    assert (area[ok] <= SCALE[1] * (1 + eps_w[ok]) * (1 + eps_h[ok])).all()
    assert (ratio[ok] >= RATIO[0] * (1 - eps_w[ok]) / (1 + eps_h[ok])).all()
    assert (ratio[ok] <= RATIO[1] * (1 + eps_w[ok]) / (1 - eps_h[ok])).all()
    assert ok.float().mean() > 0.5  # most boxes are real random crops
    # the log-ratio is uniform on a range symmetric around 0: about half of the boxes are wider than tall
    # (binomial standard deviation over >= 2000 boxes is < 0.012; 0.05 is four of them)
    big = ok & (h >= 50) & (w >= 50)
    assert big.sum() > 2000 and abs((ratio[big] > 1).double().mean().item() - 0.5) < 0.05
    # an image far outside the ratio range falls back to its center crop clamped to the range (wide and tall)
    assert crop_box(10, 400, rng) == [0, (400 - round(10 * RATIO[1])) // 2, 10, round(10 * RATIO[1])]
    assert crop_box(400, 10, rng) == [(400 - round(10 / RATIO[0])) // 2, 0, round(10 / RATIO[0]), 10]


def test_a_box_as_wide_or_as_tall_as_the_image_is_accepted_and_placed_uniformly():
    """torchvision accepts a drawn box whose side equals the image's (``0 < w <= W``): on a 50 x 100 image an area
    fraction of 1/2 at ratio 4 gives exactly 100 x 25, placed at a uniform top in 0..25 (the draw after the area
    and the ratio), never the fallback's center crop (top 12); the same transposed for a full-height box."""
    for seed in range(20):
        rng = random.Random(seed)
        box = crop_box(50, 100, rng, scale=(0.5, 0.5), ratio=(4.0, 4.0))
        ref = random.Random(seed)
        ref.uniform(0.5, 0.5), ref.uniform(math.log(4.0), math.log(4.0))
        assert box == [ref.randint(0, 25), 0, 25, 100]
        box = crop_box(100, 50, random.Random(seed), scale=(0.5, 0.5), ratio=(0.25, 0.25))
        ref = random.Random(seed)
        ref.uniform(0.5, 0.5), ref.uniform(math.log(0.25), math.log(0.25))
        assert box == [ref.randint(0, 0), ref.randint(0, 25), 100, 25]  # the top's draw comes first


def test_augmentation_is_a_function_of_seed_epoch_index():
    a = sample_augmentation(3, 1, 17, 300, 400)
    assert a == sample_augmentation(3, 1, 17, 300, 400)
    draws = {str(sample_augmentation(3, e, i, 300, 400)) for e in range(3) for i in range(5)}
    assert len(draws) == 15
    # the flip is a fair coin (RandomHorizontalFlip's p = 0.5): over 4000 samples the count of flips has binomial
    # standard deviation sqrt(4000 / 4) = 31.6, and the seeded draws are fixed, so +-200 (over 6 of them) cannot
    # fail by chance and a coin of p = 0.25 or 0.75 (1000 or 3000 flips) cannot pass
    flips = sum(sample_augmentation(3, 0, i, 300, 400)[1] for i in range(4000))
    assert abs(flips - 2000) < 200
    assert not any(sample_augmentation(3, 0, i, 300, 400, flip=False)[1] for i in range(100))


def test_flip_is_a_mirror_of_the_same_crop():
    data = jpeg_bytes(np.random.default_rng(2), 0, (60, 80))
    flips = {}
    for index in range(40):
        box, flipped = sample_augmentation(0, 0, index, 60, 80)
        flips.setdefault(flipped, (index, box))
    assert set(flips) == {True, False}
    image = decode_rgb(data)
    for flipped, (index, box) in flips.items():
        out = train_image(data, 0, 0, index, 24)
        plain = crop_resize(image, box, 24)
        assert torch.equal(out, plain.flip(-1) if flipped else plain)
    off = train_image(data, 0, 0, flips[True][0], 24, flip=False)
    assert torch.equal(off, crop_resize(image, flips[True][1], 24))


def _batches(dm, train: bool):
    dm.setup("fit")
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    return [dm.on_after_batch_transfer(dm.transfer_batch_to_device(b, torch.device("cpu"), 0), 0) for b in loader]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("train", [True, False])
def test_device_path_equals_worker_path_on_cpu(tmp_path, train, threads):
    """decode_on_device on a CPU trainer decodes in the training process with ``decode_threads`` threads: the same
    batches as the worker path, whatever the thread count."""
    root = write_imagenet_tree(tmp_path / "in", classes=3, per_class=4, val_per_class=2)
    kwargs = dict(data_dir=str(root), num_classes=3, image_size=24, eval_resize=28, batch_size=4, num_workers=0)
    worker = _batches(ImageNetDataModule(decode_on_device=False, **kwargs), train)
    device = _batches(ImageNetDataModule(decode_on_device=True, decode_threads=threads, **kwargs), train)
    assert len(worker) == len(device) == (3 if train else 2)  # 12 training images, 6 validation images
    for a, b in zip(worker, device):
        assert set(a) == set(b) == {"image", "target", "index"}
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["target"], b["target"])
        assert torch.equal(a["image"], b["image"])  # same decoder, same crop function: bit-identical
        assert a["image"].dtype == torch.float32 and a["image"].shape[-2:] == (24, 24)


def test_evaluation_pixels_of_png_cmyk_and_gray_files_agree_on_every_path(tmp_path):
    """Files nvJPEG cannot take (PNG saved as .JPEG, CMYK and grayscale JPEGs; ImageNet has a few) are re-encoded as
    RGB JPEG where bytes are shipped (``eval_bytes``, ``convert``); the worker's evaluation crop and the lazy images
    of the prediction pass decode the same bytes. They used to decode the original file: up to 2 levels apart."""
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=2, val_per_class=1, size=(60, 80))
    gray = np.random.default_rng(4).integers(0, 256, (70, 90), dtype=np.uint8)
    folder = root / "val" / sorted(p.name for p in (root / "val").iterdir())[0]
    for kind in ("L", "CMYK", "PNG"):
        buf = io.BytesIO()
        if kind == "PNG":
            Image.fromarray(np.stack([gray] * 3, -1)).save(buf, "PNG")
        else:
            Image.fromarray(gray).convert(kind).save(buf, "JPEG")
        (folder / f"z_{kind}.JPEG").write_bytes(buf.getvalue())
    kwargs = dict(data_dir=str(root), num_classes=2, image_size=32, eval_resize=36, batch_size=4, num_workers=0,
                  eval_batch_size=8)
    worker = _batches(ImageNetDataModule(decode_on_device=False, **kwargs), False)
    dm = ImageNetDataModule(decode_on_device=True, **kwargs)
    device = _batches(dm, False)
    assert len(worker) == len(device) == 1 and len(worker[0]["index"]) == 5
    assert torch.equal(worker[0]["image"], device[0]["image"])
    lazy = dm.test_set.images[list(range(5))]
    raw = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)  # bytes decoded, then normalized
    assert torch.equal(normalize_uint8(lazy, dm.mean, dm.std), raw["image"])


@pytest.mark.parametrize("train", [True, False])
def test_batched_decode_gives_the_per_image_pixels_on_cpu(tmp_path, train):
    """What decode_batch does on CUDA (one decode_jpeg call for the batch, then the crops, the flip mask or the
    evaluation crop), run on the CPU, where torchvision's decoder is libjpeg-turbo as on the per-image path: the same
    pixels exactly, grayscale JPEGs included, so on a GPU only nvJPEG's own pixels remain to check (the test below)."""
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=6, val_per_class=2, size=(120, 160))
    gray = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130), dtype=np.uint8), "L").save(gray, "JPEG")
    for split in ("train", "val"):
        folder = next(p for p in sorted((root / split).iterdir()) if p.is_dir())
        (folder / f"{folder.name}_gray.JPEG").write_bytes(gray.getvalue())
    dm = ImageNetDataModule(str(root), num_classes=2, image_size=64, eval_resize=72,
                            batch_size=13 if train else 5, num_workers=0, decode_on_device=True)
    dm.setup("fit")  # the training loader drops a last partial batch: one batch of all 13 images
    batch = next(iter(dm.train_dataloader() if train else dm.val_dataloader()))
    assert len(batch["index"]) == (13 if train else 5)
    data = [t.clone() for t in unpack_jpegs(batch["jpeg"], batch["jpeg_offsets"])]
    if train:
        assert set(batch["flip"].tolist()) == {True, False}  # both branches of the flip mask are taken
        together = decode_together(data, 64, "cpu", batch["box"].tolist(), batch["flip"].tolist())
    else:
        together = decode_together(data, 64, "cpu", eval_resize=72)
    # a file's name is looked up only for an image that fails (a search through the data set's indices)
    per_image = decode_batch(dict(batch), 64, "cpu", eval_resize=72, name_of=lambda i: pytest.fail("name looked up"))
    assert together.dtype == torch.uint8 and together.shape == (len(data), 3, 64, 64)
    assert torch.equal(together, per_image)


@pytest.mark.gpu
def test_decode_on_cuda_equals_decode_on_cpu(tmp_path):
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=4, val_per_class=1, size=(120, 160))
    dm = ImageNetDataModule(str(root), num_classes=2, image_size=64, eval_resize=72, batch_size=8, num_workers=0,
                            decode_on_device=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    cpu = decode_batch(dict(batch), 64, "cpu").float()
    cuda = decode_batch(dict(batch), 64, "cuda").float().cpu()
    # nvJPEG and libjpeg-turbo are both IEEE-1180-accurate IDCTs (+-1 per sample) but upsample chroma differently;
    # the resize then averages neighbouring pixels, so means agree to a fraction of a level
    diff = (cpu - cuda).abs()
    assert diff.mean() < 1.0 and math.isfinite(diff.max().item())
    assert diff.max() <= 16


def test_fused_normalization_matches_the_plain_formula():
    from lightning_methods.datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from lightning_methods.datamodules.jpeg_pipeline import normalize_uint8
    from lightning_methods.datamodules.transforms import normalize

    x = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 4, 1)
    fused, plain = normalize_uint8(x, IMAGENET_MEAN, IMAGENET_STD), normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    # both are a few float32 operations on values of magnitude <= 2.7: a few ulps of 2.7 apart at most
    assert torch.allclose(fused, plain, rtol=0, atol=8 * torch.finfo(torch.float32).eps * 2.7)


def test_normalized_cpu_batches_reuse_memory_only_once_nothing_holds_it():
    """On the CPU a normalized batch goes into memory of an earlier batch only when no tensor, view, detached tensor,
    NumPy array or autograd record refers to that batch any more: a batch still in use is never written over."""
    from lightning_methods.datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from lightning_methods.datamodules.jpeg_pipeline import _BATCH_MEMORY, normalize_uint8
    from lightning_methods.datamodules.transforms import normalize

    if _BATCH_MEMORY.use_count is None:
        pytest.skip("this torch exposes no storage use count: every batch is allocated afresh")

    def batch(v: int) -> torch.Tensor:
        return (torch.arange(2 * 3 * 4 * 5) % 7 + v).to(torch.uint8).view(2, 3, 4, 5)

    def norm(v: int) -> torch.Tensor:
        return normalize_uint8(batch(v), IMAGENET_MEAN, IMAGENET_STD)

    def expected(v: int) -> torch.Tensor:  # the plain formula, in fresh memory
        return normalize(batch(v), IMAGENET_MEAN, IMAGENET_STD)

    tol = dict(rtol=0, atol=8 * torch.finfo(torch.float32).eps * 2.7)  # as in the test above
    first = norm(1)
    address = first.data_ptr()
    del first
    second = norm(2)
    assert second.data_ptr() == address  # released memory is taken again: the kept buffer
    assert address in [s.data_ptr() for s in _BATCH_MEMORY.buffers[(2, 3, 4, 5)]]
    assert torch.allclose(second, expected(2), **tol)
    del second
    holders = {"tensor": lambda t: t, "view": lambda t: t[1:], "detached": lambda t: t.detach(),
               "numpy": lambda t: t.numpy()}
    for v, (name, hold) in enumerate(holders.items(), start=10):
        out = norm(v)
        kept = hold(out)
        del out
        later = [norm(v + 100 + k) for k in range(3)]  # more batches than the memory kept for one shape
        whole = expected(v)
        reference = whole[1:] if name == "view" else whole
        assert torch.allclose(torch.as_tensor(kept), reference, **tol), name
        assert all(torch.allclose(t, expected(v + 100 + k), **tol) for k, t in enumerate(later)), name
        del kept, later
    weight = torch.ones(1, requires_grad=True)
    out = norm(50)
    loss = (out * weight).sum()  # autograd keeps ``out`` for the weight's gradient
    del out
    others = [norm(60 + k) for k in range(3)]
    del others
    loss.backward()
    assert torch.allclose(weight.grad, expected(50).sum().view(1), rtol=1e-5, atol=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_never_writes_into_its_parents_batch_memory():
    """The reused buffers are shared with forked children (so that forking the DataLoader's workers does not make
    them copy-on-write): a child must start without them, or its batches would land in the parent's memory."""
    import ctypes

    from lightning_methods.datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from lightning_methods.datamodules.jpeg_pipeline import _BATCH_MEMORY, normalize_uint8

    if _BATCH_MEMORY.use_count is None:
        pytest.skip("this torch exposes no storage use count: every batch is allocated afresh")
    zeros, full = torch.zeros(2, 3, 4, 6, dtype=torch.uint8), torch.full((2, 3, 4, 6), 255, dtype=torch.uint8)
    out = normalize_uint8(zeros, IMAGENET_MEAN, IMAGENET_STD)
    address, nbytes = out.data_ptr(), out.nbytes
    del out  # free again in the parent: a child that inherited the buffers would take it
    before = ctypes.string_at(address, nbytes)
    pid = os.fork()
    if pid == 0:
        try:
            normalize_uint8(full, IMAGENET_MEAN, IMAGENET_STD)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert ctypes.string_at(address, nbytes) == before  # the parent's memory as it left it
    assert normalize_uint8(full, IMAGENET_MEAN, IMAGENET_STD).data_ptr() == address  # and still its own buffer


def test_worker_batches_are_built_in_shared_memory(tmp_path):
    """A worker stacks the images of a batch straight into shared memory (no copy when the batch is handed over);
    the batches equal those built in the training process."""
    from torch.utils.data import DataLoader

    from lightning_methods.datamodules.base import collate_dict
    from lightning_methods.datamodules.jpeg_dataset import EpochTaggedSampler

    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=4, val_per_class=1)
    dm = ImageNetDataModule(str(root), num_classes=2, image_size=24, eval_resize=28, batch_size=4, num_workers=0)
    dm.setup("fit")
    data = dm.train_set.with_mode("train")

    def batches(workers: int) -> list[dict]:
        loader = DataLoader(data, batch_size=4, sampler=EpochTaggedSampler(len(data)), num_workers=workers,
                            collate_fn=collate_dict)
        return list(loader)

    here, there = batches(0), batches(1)
    assert len(here) == len(there) == 2
    for a, b in zip(here, there):
        assert b["image"].is_shared() and not a["image"].is_shared()
        assert all(torch.equal(a[k], b[k]) for k in ("image", "target", "index"))


def _encoded(fmt: str, **kwargs) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(7)
    base = np.clip(rng.normal(128, 60, (37, 53, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(base).convert(kwargs.pop("mode", "RGB"))
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue(), np.array(Image.open(io.BytesIO(out.getvalue())).convert("RGB"))


@pytest.mark.parametrize("kind", ["baseline", "progressive", "444", "422", "gray", "cmyk", "png"])
def test_both_cpu_decoders_give_pillows_pixels(kind, monkeypatch):
    """simplejpeg (the streaming extra) and torchvision's decoder are both libjpeg-turbo with default settings: the
    same pixels as Pillow's, bit for bit; CMYK JPEGs and PNGs go to torchvision."""
    from lightning_methods.datamodules import jpeg_pipeline

    options = {"baseline": {}, "progressive": {"progressive": True}, "444": {"subsampling": 0},
               "422": {"subsampling": 1}, "gray": {"mode": "L"}, "cmyk": {"mode": "CMYK"}}
    data, pil = _encoded("PNG") if kind == "png" else _encoded("JPEG", quality=85, **options[kind])
    assert jpeg_pipeline._simplejpeg() is not None, "simplejpeg comes with the streaming extra"
    fast = decode_rgb(data)
    monkeypatch.setattr(jpeg_pipeline, "_SIMPLEJPEG", False)  # torchvision.io only
    plain = decode_rgb(data)
    assert fast.shape == plain.shape == (3, *pil.shape[:2])
    assert torch.equal(plain, fast)
    if kind != "cmyk":  # Pillow inverts Adobe CMYK JPEGs on its own; libjpeg-turbo's conversion is the reference
        assert torch.equal(fast, torch.from_numpy(pil).permute(2, 0, 1))


def test_resizes_equal_torchvisions_on_decoder_views():
    """crop_resize / eval_resize_crop call torch's uint8 kernel on the decoder's channels-last view; torchvision's
    resized_crop / resize + center_crop on a contiguous copy give the same pixels (upscaling and downscaling boxes,
    portrait, landscape, square and already-sized images)."""
    from torchvision.transforms.v2 import functional as TF

    from lightning_methods.datamodules.jpeg_pipeline import eval_resize_crop

    rng = np.random.default_rng(3)
    # (61, 95) and (95, 61): the longer side 28 * 95 / 61 = 43.6 is truncated to 43 by torchvision, not rounded
    for h, w in ((61, 90), (90, 61), (61, 95), (95, 61), (64, 64), (28, 40)):
        view = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)
        assert not view.is_contiguous()
        image = view.contiguous()
        for box in ([0, 0, h, w], [3, 5, h // 3, w // 2], [h // 2, w // 4, h - h // 2, 7]):
            expect = TF.resized_crop(image, *box, [24, 24], antialias=True)
            assert torch.equal(crop_resize(view, box, 24), expect), (h, w, box)
        expect = TF.center_crop(TF.resize(image, [28], antialias=True), [24, 24])
        assert torch.equal(eval_resize_crop(view, 28, 24), expect), (h, w)


def test_decode_threads_must_be_positive():
    with pytest.raises(ValueError, match="decode_threads must be at least 1, got 0"):
        ImageNetDataModule(decode_threads=0)
