"""Throughput of the ImageNet-scale input pipeline (a benchmark, not a test): runnable on its own.

    python benchmarks/imagenet_cases.py                 # CPU section: images/s of the loaders
    python benchmarks/imagenet_cases.py --gpu           # + GPU section (needs CUDA; about 2-4 minutes)

The data: a JPEG tree of ImageNet-like photographs (crops of scikit-learn's two bundled photos, 300-427 x 375-640
pixels, JPEG quality 90, 4 classes), written once into a temporary folder and converted with ``prepare-data convert``.

CPU section, same tree, same worker count, rounds interleaved (the median of the rounds is reported), as images per
second of wall time and images per CPU-second of the main process and its workers together (per core: robust to
other jobs on the machine):

- ``ImageFolder + PIL``: torchvision ``ImageFolder`` with ``RandomResizedCrop(224), RandomHorizontalFlip(), ToTensor(),
  Normalize`` per sample in DataLoader workers (float32 batches);
- ``streaming + batched``: ``ImageNetDataModule(streaming=...)``: workers decode (libjpeg-turbo via simplejpeg, or
  torchvision without it), crop and flip in uint8, batches are normalized at once in the main process
  (``on_after_batch_transfer``);
- ``streaming bytes, decoded in the training process``: ``decode_on_device=True`` on the CPU: the workers only read
  the JPEG bytes and draw the crops; ``on_after_batch_transfer`` decodes, crops and flips the batch with
  ``decode_threads`` threads (up to 4) of the main process, then normalizes it;
- ``folder + batched``: the workers' pipeline reading the folder tree;
- ``streaming + batched, whole-image decode``: the streaming case with region decoding off
  (``LIGHTNING_METHODS_TURBOJPEG=off``: each image decoded whole, then cropped; the same pixels), to show what
  decoding only the crop's region saves (``datamodules/jpeg_region.py``; the other package cases use it when a
  TurboJPEG 3 library is found, recorded as ``region_decode`` in the environment).

Section ``imagenet`` of ``benchmarks/throughput.py`` runs the same loaders through the harness (:func:`cases`).

GPU section: ResNet-50 (torchvision), bf16 autocast, channels-last, SGD steps/s fed (a) from one synthetic batch
already on the GPU, (b) from the streaming pipeline with ``decode_on_device=True`` (nvJPEG decode, crops and flips on
the GPU: the default on CUDA) and (c) from the streaming pipeline decoding in ``--gpu-workers`` CPU workers (uint8
batches, normalized on the GPU); each pipeline's cost is ``1 - (b or c) / (a)`` (target: under 5%), and the two tell
which decode path a machine should use.

Prints a Markdown table and writes ``imagenet_benchmark.json`` (with versions, threads, CPU, load average and device).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_photo_tree(root: Path, images: int, classes: int = 4, seed: int = 0) -> Path:
    """``root/train/<class>/*.JPEG`` and a small ``root/val`` of ImageNet-sized crops of the sklearn photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", classes)):
        for n in range(count):
            c = n % classes
            photo = photos[c % 2]
            h, w = int(rng.integers(300, 428)), int(rng.integers(375, 641))
            top, left = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
            crop = photo[top : top + h, left : left + w]
            if c >= 2:
                crop = crop[:, ::-1]
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG", quality=90)
            (folder / f"img{n:06d}.JPEG").write_bytes(buf.getvalue())
    return root


def pil_loader(root: Path, batch: int, workers: int) -> Any:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    data = datasets.ImageFolder(str(root / "train"), transform=tf)
    return DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


def package_dm(root: Path, streaming: str | None, batch: int, workers: int, on_device: bool = False,
               threads: int | None = None, pin: bool = False) -> Any:
    from lightning_methods.datamodules import ImageNetDataModule

    dm = ImageNetDataModule(str(root), streaming=streaming, num_classes=4, batch_size=batch, num_workers=workers,
                            decode_on_device=on_device, decode_threads=threads, pin_memory=pin)
    dm.setup("fit")
    return dm


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its reaped children (the DataLoader workers of finished
    epochs): dividing images by the difference gives images per CPU-second, i.e. per core, which other jobs on the
    machine do not distort the way they distort wall time."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def epoch_rate(loader: Any, finish: Any = None) -> tuple[float, float]:
    """``(images per second, images per CPU-second)`` of one pass over ``loader`` (``finish`` turns a raw batch into
    the normalized images). The loaders' workers are not persistent: they are shut down and reaped (so counted) at
    the end. No ``gc.collect()`` inside the timed span: a full collection of this interpreter's heap costs about
    0.2 s of CPU, a per-epoch constant of the benchmark, not of either loader. Each batch is released before the next
    is made, as Lightning's loop does: a float batch still alive makes the next one fault in fresh pages (0.2 ms per
    224 px image instead of 0.03 ms for the conversion)."""
    cpu, start, seen = cpu_seconds(), time.perf_counter(), 0
    iterator = iter(loader)
    for batch in iterator:  # each batch of images is dropped before the next is made, as in a training loop
        seen += (finish(batch) if finish is not None else batch[0]).shape[0]
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:  # joins (reaps) the workers now, so their CPU time is in RUSAGE_CHILDREN
        shutdown()
    del iterator
    wall = time.perf_counter() - start
    return seen / wall, seen / max(cpu_seconds() - cpu, 1e-9)


PIL_CASE = "ImageFolder + PIL transforms (workers)"


class WholeImageDecode:
    """A loader whose epochs run with region decoding off (:func:`whole_image_decode`; its workers start inside)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Any:
        with whole_image_decode():
            yield from self.loader  # a non-persistent loader shuts its workers down (reaped) at the epoch's end


def cpu_loaders(root: Path, conv: str, batch: int, workers: int) -> dict[str, tuple[Any, Any]]:
    """The loaders of the CPU comparison, as ``{name: (loader, finish)}`` (``finish`` turns a raw batch into
    the normalized images; ``None``: the loader's first element already is)."""
    from torch.utils.data import DataLoader

    from lightning_methods.datamodules.base import collate_dict
    from lightning_methods.datamodules.jpeg_dataset import EpochTaggedSampler

    cases: dict[str, tuple[Any, Any]] = {PIL_CASE: (pil_loader(root, batch, workers), None)}
    stream = package_dm(root, conv, batch, workers)
    cases["streaming + batched uint8 pipeline"] = (stream.train_dataloader(),
                                                   lambda b: stream.on_after_batch_transfer(b, 0)["image"])
    threads = max(1, min(4, os.cpu_count() or 1))
    raw = package_dm(root, conv, batch, workers, on_device=True, threads=threads)
    cases[f"streaming bytes, decoded in the training process by {threads} threads"] = (
        raw.train_dataloader(), lambda b: raw.on_after_batch_transfer(b, 0)["image"])
    whole = package_dm(root, conv, batch, workers)
    cases["streaming + batched uint8 pipeline, whole-image decode"] = (
        WholeImageDecode(whole.train_dataloader()), lambda b: whole.on_after_batch_transfer(b, 0)["image"])
    folder = package_dm(root, None, batch, workers)
    cases["folder + batched uint8 pipeline"] = (
        DataLoader(folder.train_set.with_mode("train"), batch_size=batch, sampler=EpochTaggedSampler(
            len(folder.train_set)), num_workers=workers, drop_last=True, collate_fn=collate_dict),
        lambda b: folder.on_after_batch_transfer(b, 0)["image"])
    return cases


def cpu_section(root: Path, conv: str, batch: int, workers: int, rounds: int) -> list[dict[str, Any]]:
    cases = cpu_loaders(root, conv, batch, workers)
    for loader, finish in cases.values():  # warm-up: page cache, imports in the workers
        epoch_rate(loader, finish)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (loader, finish) in cases.items():
            rates[name].append(epoch_rate(loader, finish))
    base = statistics.median(r[1] for r in rates[PIL_CASE])
    rows = []
    for name, values in rates.items():
        wall, per_cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        rows.append({"case": name, "images_per_s": round(wall, 1), "images_per_cpu_s": round(per_cpu, 1),
                     "vs_pil_per_core": round(per_cpu / base, 2), "rounds_per_cpu_s": [round(v[1], 1) for v in values]})
    return rows


_KEEP: list[Any] = []  # the temporary trees of :func:`cases`, removed when the process ends


def cases(s: Any) -> list[tuple]:
    """Section ``imagenet`` of ``benchmarks/throughput.py``: the loaders of the CPU comparison on one photo
    tree at 224 px, one epoch per call, interleaved by the harness. A case returns the **CPU-seconds** (main process
    and its reaped workers) per batch, so the ratio to the PIL baseline is per core: 0.5 means twice the images per
    CPU-second. Sizes: small mode 64 images, batch 16, in-process; CPU modes 2048 images, batch 32, one worker
    (each epoch starts its worker, about 50-60 ms of CPU per epoch and loader: a short epoch would weigh that more
    than an ImageNet epoch does); GPU mode 2048 images, batch 128, up to 8 workers."""
    from lightning_methods.imagenet.prepare import convert

    if s.n_train <= 256:
        images, batch, workers = 64, 16, 0
    elif s.device == "cpu":
        images, batch, workers = 2048, 32, 1
    else:
        images, batch, workers = 2048, 128, min(8, os.cpu_count() or 1)
    tmp = tempfile.TemporaryDirectory()
    _KEEP.append(tmp)
    root = write_photo_tree(Path(tmp.name) / "tree", images)
    convert(root, str(Path(tmp.name) / "conv"), num_workers=1, verify=False)

    def per_batch(loader: Any, finish: Any) -> float:
        return batch / epoch_rate(loader, finish)[1]

    where = f"{workers} worker{'s' if workers != 1 else ''}" if workers else "in-process"
    out = []
    for name, (loader, finish) in cpu_loaders(root, str(Path(tmp.name) / "conv"), batch, workers).items():
        label = f"{name.replace(' (workers)', '')}, {where}: CPU-seconds per batch of {batch}"
        out.append((label + (" (baseline)" if name == PIL_CASE else ""),
                    lambda loader=loader, finish=finish: per_batch(loader, finish), batch))
    return out


def gpu_section(conv: str, root: Path, batch: int, workers: int, steps: int, warmup: int, device: str = "cuda",
                arch: str = "resnet50") -> list[dict[str, Any]]:
    """The GPU section's three cases (``device`` / ``arch`` other than CUDA / ResNet-50 only for a smoke test)."""
    import torchvision

    device = torch.device(device)
    name = {"resnet50": "ResNet-50"}.get(arch, arch)
    model = getattr(torchvision.models, arch)(num_classes=4).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lossf = torch.nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lossf(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batches(on_device: bool) -> Any:
        dm = package_dm(root, conv, batch, workers, on_device=on_device, pin=device.type == "cuda")
        while True:
            for b in dm.train_dataloader():
                b = dm.on_after_batch_transfer(dm.transfer_batch_to_device(b, device, 0), 0)
                yield b["image"], b["target"]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def rate(source: Any) -> float:
        for _ in range(warmup):
            step(*next(source))
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step(*next(source))
        sync()
        seconds = time.perf_counter() - start
        source.close()  # a loader's workers stop before the next case
        return steps / seconds

    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 4, (batch,), device=device)

    def synthetic() -> Any:
        while True:
            yield x, y

    synth, nvjpeg, workers_fed = rate(synthetic()), rate(batches(True)), rate(batches(False))
    return [{"case": f"{name} bf16 channels-last, synthetic batch on the device", "steps_per_s": round(synth, 2)},
            {"case": f"{name} bf16 channels-last, fed by streaming + nvJPEG decode (decode_on_device=True)",
             "steps_per_s": round(nvjpeg, 2), "pipeline_cost": round(1 - nvjpeg / synth, 3)},
            {"case": f"{name} bf16 channels-last, fed by streaming + decode in {workers} workers "
                     "(decode_on_device=False)", "steps_per_s": round(workers_fed, 2),
             "pipeline_cost": round(1 - workers_fed / synth, 3)}]


def environment() -> dict[str, Any]:
    import lightning
    import litdata
    import torchvision

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "lightning": lightning.__version__,
           "litdata": litdata.__version__, "python": platform.python_version(), "cpu": cpu,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average": [round(v, 2) for v in os.getloadavg()]}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    from lightning_methods.datamodules.jpeg_region import library

    lib = getattr(library(), "_name", None)  # the TurboJPEG 3 library's file (no machine path), or None: whole images
    env["region_decode"] = os.path.basename(lib) if lib else None
    return env


@contextlib.contextmanager
def whole_image_decode() -> Any:
    """Region decoding off in this process and in the workers forked inside the block (the lookup is cached)."""
    from lightning_methods.datamodules import jpeg_region

    old = os.environ.get(jpeg_region.ENV)
    os.environ[jpeg_region.ENV] = "off"
    jpeg_region.library.cache_clear()
    try:
        yield
    finally:
        if old is None:
            del os.environ[jpeg_region.ENV]
        else:
            os.environ[jpeg_region.ENV] = old
        jpeg_region.library.cache_clear()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048,
                        help="training images of the tree (one epoch per round; each epoch starts its workers)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of every CPU case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU section (CUDA)")
    parser.add_argument("--gpu-images", type=int, default=2048)
    parser.add_argument("--gpu-batch", type=int, default=128)
    parser.add_argument("--gpu-workers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the training process (1: no OpenMP team whose waiting would count "
                             "as CPU time of the loaders)")
    parser.add_argument("--out", default="imagenet_benchmark.json")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    from lightning_methods.imagenet.prepare import convert

    settings = {k: v for k, v in vars(opts).items() if k != "out"}  # no machine paths in a record
    result: dict[str, Any] = {"environment": environment(), "settings": settings}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_photo_tree(Path(tmp) / "tree", opts.images)
        convert(root, str(Path(tmp) / "conv"), num_workers=1, verify=False)
        result["cpu"] = cpu_section(root, str(Path(tmp) / "conv"), opts.batch, opts.workers, opts.rounds)
        save(result, opts.out, complete=not opts.gpu)  # a time limit during the GPU section keeps the CPU figures
        print("| case | images/s (wall) | images per CPU-second | per core vs PIL |\n|---|---|---|---|")
        for row in result["cpu"]:
            print(f"| {row['case']} | {row['images_per_s']} | {row['images_per_cpu_s']} | {row['vs_pil_per_core']}x |")
        if opts.gpu:
            if not torch.cuda.is_available():
                sys.exit("--gpu needs a CUDA device")
            groot = write_photo_tree(Path(tmp) / "gtree", opts.gpu_images)
            convert(groot, str(Path(tmp) / "gconv"), num_workers=min(8, os.cpu_count() or 1), verify=False)
            result["gpu"] = gpu_section(str(Path(tmp) / "gconv"), groot, opts.gpu_batch, opts.gpu_workers, 30, 5)
            for row in result["gpu"]:
                print(row)
    save(result, opts.out, complete=True)
    return result


def save(result: dict[str, Any], path: str, complete: bool) -> None:
    """Write the record so far (``complete``: every requested section is in it) with the load average now."""
    result["environment"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    result["complete"] = complete
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
