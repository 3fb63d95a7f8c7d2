"""Timing machinery of the throughput benchmarks: synthetic CIFAR-sized data, a raw PyTorch training loop, the same
training through ImageClassifier + Trainer, and interleaved measurement without per-step host syncs.

Every measurement times ``steps`` optimizer steps after ``warmup`` untimed ones; the device is synchronized only at
the two ends of the timed window. The cases of a section run round by round (:func:`interleave`), the order rotating
each round, and each case's time is divided by the baseline's time of the same round: load on a shared machine that
moves a whole round cancels in the ratio. A section reports the median of these per-round ratios, their 25th-75th
percentile range and the number of rounds (:func:`ratio_stats`). :func:`environment` records what the figures were
measured with (CPU, threads, ``OMP_WAIT_POLICY``, load average, library versions).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_methods import ImageClassifier, create_backbone, param_groups_by_role
from lightning_methods.datamodules import ImageDataModule, IndexedTensorDataset
from lightning_methods.datamodules.transforms import normalize, random_crop, random_hflip


@dataclass
class Settings:
    """One benchmark configuration (small CPU mode or full GPU mode)."""

    device: str
    backbone: str
    small_backbone: str
    batch_size: int
    steps: int
    warmup: int
    repeats: int
    workers: int
    n_train: int
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)


def small_settings() -> Settings:
    return Settings("cpu", "resnet8", "resnet8", 16, 2, 1, 1, 1, 256, "32-true")


def quick_settings() -> Settings:
    """A few minutes on 2 vCPUs for the core sections: resnet8 at batch 64, 4 timed steps, 5 interleaved rounds."""
    return Settings("cpu", "resnet8", "resnet8", 64, 4, 2, 5, 1, 2048, "32-true")


def cpu_settings() -> Settings:
    """For machines without a GPU: CIFAR ResNets at batch 128, enough steps for stable medians on a few cores."""
    return Settings("cpu", "resnet20", "resnet8", 128, 8, 3, 3, 1, 4096, "32-true")


def settings(mode: str) -> Settings:
    return {"small": small_settings, "quick": quick_settings, "cpu": cpu_settings, "full": full_settings,
            "gpu": gpu_settings}[mode]()


def full_settings() -> Settings:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prec = "bf16-mixed" if dev == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    return Settings(dev, "resnet18", "resnet20", 512, 50, 15, 3, 8, 50_000, prec)


def gpu_settings() -> Settings:
    """The GPU section (``--gpu``): ResNet-18 at batch 512, bf16, 30 timed steps, 3 rounds (under 5 minutes)."""
    s = full_settings()
    s.steps, s.warmup = 30, 10
    return s


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    cpu = f"{cpu_name()}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host {cpu}"
    return f"CPU only ({cpu})"


def versions() -> str:
    return ", ".join(f"{k} {v}" for k, v in library_versions().items())


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("lightning", "torchvision", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment() -> dict[str, Any]:
    """What a figure was measured with: device, CPU model, logical cores, torch threads, ``OMP_WAIT_POLICY`` and
    ``OMP_NUM_THREADS``, the 1/5/15-minute load average at the time of the call, and library versions."""
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": cpu_name(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "versions": library_versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with contextlib.suppress(OSError, AttributeError):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return env


def rotation(n: int, round_index: int) -> list[int]:
    """Order of the ``n`` cases in round ``round_index``: each round starts one case later (0 1 2, 1 2 0, 2 0 1, ...),
    so every case runs in every position equally often and none always follows the same one."""
    return [(round_index + k) % n for k in range(n)]


def interleave(fns: list[Callable[[], float]], rounds: int, warmup: bool = True) -> list[list[float]]:
    """Run every ``fn`` once per round in :func:`rotation` order; ``times[case][round]`` are the returned seconds.
    With ``warmup``, one discarded call of each case first keeps one-time costs (allocator, kernels, thread pools,
    compilation) out of the rounds."""
    if rounds < 1 or not fns:
        raise ValueError(f"need at least one case and one round, got {len(fns)} cases and rounds={rounds}")
    if warmup:
        for fn in fns:
            fn()
            release_garbage()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for i in rotation(len(fns), r):
            times[i].append(fns[i]())
            release_garbage()
    return times


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 100]) of a non-empty list, as numpy's default."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ratio_stats(times: list[float], baseline: list[float]) -> dict[str, float]:
    """Per-round ratios ``times[r] / baseline[r]``: their median, 25th and 75th percentiles, the number of rounds,
    and the median seconds of the case."""
    if len(times) != len(baseline) or not times:
        raise ValueError(f"need the same non-zero number of rounds, got {len(times)} and {len(baseline)}")
    ratios = [t / b for t, b in zip(times, baseline)]
    return {"ratio": statistics.median(ratios), "ratio_p25": percentile(ratios, 25),
            "ratio_p75": percentile(ratios, 75), "rounds": len(ratios), "seconds": statistics.median(times)}


def release_workers(obj: Any) -> None:
    """Shut down the worker processes of every DataLoader in ``obj`` (a DataLoader, a Lightning CombinedLoader, or
    lists / dicts of them). A persistent-worker iterator left alive is inherited by the workers the next case forks,
    whose garbage collection then fails with "can only test a child process"."""
    if isinstance(obj, torch.utils.data.DataLoader):
        it = getattr(obj, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        obj._iterator = None
    elif isinstance(obj, dict):
        for v in obj.values():
            release_workers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            release_workers(v)
    elif hasattr(obj, "flattened"):  # lightning's CombinedLoader
        release_workers(list(obj.flattened))


def release_garbage() -> None:
    """Collect the previous case's objects (and their loader workers) before the next case starts or forks."""
    gc.collect()


def cycle(loader: Any) -> Any:
    """Batches of ``loader``, epoch after epoch (each pass re-iterates, so shuffling continues)."""
    while True:
        yield from loader


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class SyntheticCIFAR(ImageDataModule):
    """Random uint8 32x32 images with 100 classes, loaded like the CIFAR DataModules."""

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def __init__(self, n_train: int = 50_000, per_sample_indexing: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_train = n_train
        self.per_sample_indexing = per_sample_indexing

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (self.n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 100, (self.n_train,), generator=g)
        return {"train": (x, y), "test": (x[:256], y[:256])}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.per_sample_indexing:  # the "before" data path: one __getitem__ per sample + default_collate
            self.train_set.__class__ = PerSampleDataset


class PerSampleDataset(IndexedTensorDataset):
    __getitems__ = None  # DataLoader falls back to per-sample __getitem__ and default_collate


class WindowTimer(Callback):
    """Wall time of the training batches after ``warmup``, synchronized only at both ends."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device, self.batches, self.t0, self.elapsed = warmup, device, 0, None, None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.batches == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()
        self.batches += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(self.device)
        self.elapsed = time.perf_counter() - self.t0


def data(s: Settings, **kwargs: Any) -> SyntheticCIFAR:
    kw = dict(batch_size=s.batch_size, num_workers=s.workers, n_train=s.n_train)
    kw.update(kwargs)
    return SyntheticCIFAR(**kw)


def time_trainer(s: Settings, model: L.LightningModule, dm: L.LightningDataModule, precision: str | None = None,
                 callbacks: list[Callback] | None = None, quiet: bool = True, **trainer_kw: Any) -> float:
    """Seconds per training batch of ``model`` on ``dm`` through a Trainer."""
    timer = WindowTimer(s.warmup, s.device)
    kw = dict(accelerator="gpu" if s.device.startswith("cuda") else "cpu", devices=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              max_steps=s.warmup + s.steps, precision=precision or s.precision, benchmark=True)
    kw.update(trainer_kw)
    trainer = L.Trainer(callbacks=[timer, *(callbacks or [])], **kw)
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out) if quiet else contextlib.nullcontext():
            trainer.fit(model, dm)
    finally:
        release_workers(trainer.fit_loop._combined_loader)
    return timer.elapsed / (timer.batches - s.warmup)


def time_raw_loop(s: Settings, backbone: str, dm: SyntheticCIFAR, precision: str | None = None,
                  channels_last: bool = False) -> float:
    """Seconds per step of a hand-written loop: same model, optimizer, augmentation (on the device) and precision."""
    precision = precision or s.precision
    dm.setup("fit")
    device = torch.device(s.device)
    model = create_backbone(backbone, 100).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups_by_role(model), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = dm.train_dataloader()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    gen = torch.Generator(device=device).manual_seed(0)

    it = cycle(loader)
    for i in range(s.warmup + s.steps):
        if i == s.warmup:
            sync(s.device)
            t0 = time.perf_counter()
        batch = next(it)
        image = batch["image"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        image = normalize(random_hflip(random_crop(image, 4, gen), 0.5, gen), dm.mean, dm.std)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(model(image).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(s.device)
    elapsed = (time.perf_counter() - t0) / s.steps
    it.close()
    release_workers(loader)
    return elapsed


def classifier(backbone: str, optimizer: Callable | None = None, **kwargs: Any) -> ImageClassifier:
    opt = optimizer or (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4))
    return ImageClassifier(backbone, 100, optimizer=opt, **kwargs)


def median_time(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


class PILRecipeDataset(torch.utils.data.Dataset):
    """The classic torchvision CIFAR recipe: PIL image per sample, RandomCrop(32, 4) + flip + ToTensor + Normalize."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean: tuple, std: tuple) -> None:
        from torchvision import transforms as T

        self.images, self.targets = images.permute(0, 2, 3, 1).numpy(), targets
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        return {"image": self.transform(Image.fromarray(self.images[i])), "target": self.targets[i]}


def time_input(s: Settings, kind: str, workers: int | None = None) -> float:
    """Seconds per training batch of the input pipeline alone (loading + augmentation + normalization on the
    device), no model: ``kind`` is "pil", "per_sample", "batched" or "resident"."""
    workers = s.workers if workers is None else workers
    dm = data(s, batch_size=256, gpu_resident=kind == "resident", per_sample_indexing=kind == "per_sample",
              num_workers=workers)
    dm.setup("fit")
    device = torch.device(s.device)
    if kind == "pil":
        ds = PILRecipeDataset(dm.train_set.images, dm.train_set.targets, dm.mean, dm.std)
        loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True, drop_last=True, num_workers=workers,
                                             persistent_workers=workers > 0, pin_memory=dm.pin_memory)
    elif kind == "resident":
        from lightning_methods.datamodules import DeviceBatchLoader

        loader = DeviceBatchLoader(dm.train_set, 256, device)
    else:
        loader = dm._loader(dm.train_set, train=True)
    gen = torch.Generator(device=device).manual_seed(0)

    it = cycle(loader)
    warm, batches = max(2, workers * 2), 3 * s.steps
    for i in range(warm + batches):
        if i == warm:
            sync(s.device)
            t0 = time.perf_counter()
        batch = next(it)
        image = batch["image"].to(device, non_blocking=True)
        if image.dtype == torch.uint8:  # the package path: batched crop / flip / normalize on the device
            image = normalize(random_hflip(random_crop(image, 4, gen), 0.5, gen), dm.mean, dm.std)
    sync(s.device)
    elapsed = (time.perf_counter() - t0) / batches
    it.close()
    release_workers(loader)
    return elapsed
