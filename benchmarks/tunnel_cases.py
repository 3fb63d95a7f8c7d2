"""tunnel section: the cost of probing all 19 layers of VGG-19 (``vgg19_3fc``) against one training epoch
(Masarczyk et al., *The Tunnel Effect*, NeurIPS 2023, arXiv 2305.19753).

Cases (baseline first; every time is per named unit, ratio = time / baseline):
- one training epoch of VGG-19 on ``n_epoch`` images (time per step x steps per epoch);
- one complete probe run: feature extraction of the probe train subset and the test subset (one forward pass per
  batch for all 19 layers, i.e. 1 pass over each split), 19 linear probes trained together, 19 numerical ranks;
- feature extraction of one split for all 19 layers in one pass, and the naive alternative of one pass per layer
  (19 passes over the split): the saving of the single pass;
- the 19 linear probes alone and the 19 ranks alone (their share of the probe run).

Sizes: small mode (smoke test) VGG-19 at 1/8 width, 16 training / 16 test probe images, 1 probe epoch, features
pooled to <= 2x2; CPU mode 512 / 512 probe images (the single-pass vs per-layer comparison, probes and ranks on a
split of 128), 5 probe epochs, unpooled fp16 features, epoch of 4096 images at batch 128; full mode (GPU) the
configs' setting: 10,000 / 10,000 images (splits of 10,000), 30 probe epochs, unpooled fp16 features, epoch of
50,000 images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from lightning_methods.analysis.features import ProbePoint, extract_features
from lightning_methods.analysis.linear_probe import train_linear_probes
from lightning_methods.analysis.rank import numerical_rank
from lightning_methods.datamodules import IndexedTensorDataset, collate_dict
from lightning_methods.models import create_backbone
from lightning_methods.tunnel import ProbeData, ProbeSettings, TunnelProber, probe_points
from lightning_methods.tunnel.data import image_preparer

from harness import Settings, classifier, data, sync, time_trainer

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _sizes(s: Settings) -> dict:
    if s.n_train <= 256:
        return {"train": 16, "test": 16, "split": 16, "epochs": 1, "pool": 2, "dtype": "float32",
                "epoch_images": s.n_train, "width": 0.125}
    if s.device == "cpu":
        return {"train": 512, "test": 512, "split": 128, "epochs": 5, "pool": None, "dtype": "float16",
                "epoch_images": s.n_train, "width": 1.0}
    return {"train": 10_000, "test": 10_000, "split": 10_000, "epochs": 30, "pool": None, "dtype": "float16",
            "epoch_images": 50_000, "width": 1.0}


def _dataset(n: int, seed: int) -> IndexedTensorDataset:
    g = torch.Generator().manual_seed(seed)
    return IndexedTensorDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                                torch.randint(0, 10, (n,), generator=g))


def cases(s: Settings) -> list[tuple]:
    z = _sizes(s)
    device = torch.device(s.device)
    model = create_backbone("vgg19_3fc", 10, width=z["width"]).to(device).eval()
    points = probe_points(model, example=torch.zeros(1, 3, 32, 32))
    data_id = ProbeData("synthetic", _dataset(z["train"], 0), _dataset(z["test"], 1), 10)
    prepare = image_preparer(SimpleNamespace(mean=MEAN, std=STD), device)  # anything with the DataModule's mean/std
    settings = ProbeSettings(max_train_samples=None, probe_epochs=z["epochs"], pool_size=z["pool"],
                             feature_dtype=z["dtype"], extract_batch_size=min(256, s.batch_size * 2),
                             memory_budget_gb=None)
    split = ProbeData("split", _dataset(z["split"], 2), _dataset(z["split"], 3), 10).test
    loader = torch.utils.data.DataLoader(split, batch_size=settings.extract_batch_size, collate_fn=collate_dict)

    def timed(fn: Callable[[], object]) -> float:
        sync(s.device)
        t0 = time.perf_counter()
        fn()
        sync(s.device)
        return time.perf_counter() - t0

    def epoch() -> float:
        net = classifier("vgg19_3fc", backbone_kwargs={"width": z["width"]})
        per_step = time_trainer(s, net, data(s, gpu_resident=True))
        return per_step * (z["epoch_images"] // s.batch_size)

    def extract(selection: list[ProbePoint]) -> object:
        return extract_features(model, selection, loader, z["split"], prepare, pool_size=z["pool"], dtype=z["dtype"])

    features: dict = {}

    def probes() -> float:
        if not features:
            features.update(extract(points).features)
        return timed(lambda: train_linear_probes(features, split.targets, 10, solver="adam", epochs=z["epochs"],
                                                     batch_size=512, device=device))

    def ranks() -> float:
        if not features:
            features.update(extract(points).features)
        return timed(lambda: [numerical_rank(f, device=device) for f in features.values()])

    n_probe = z["train"] + z["test"]
    return [
        (f"VGG-19 training, per epoch of {z['epoch_images']} images (baseline)", epoch, z["epoch_images"]),
        (f"probe all 19 layers, per run ({z['train']} + {z['test']} images, 1 pass per split)",
         lambda: timed(lambda: TunnelProber(settings).run(model, data_id, prepare, device=device, points=points)),
         n_probe),
        (f"extract 19 layers, one pass, per split of {z['split']}", lambda: timed(lambda: extract(points)),
         z["split"]),
        (f"extract 19 layers, 19 passes (one per layer), per split of {z['split']}",
         lambda: timed(lambda: [extract([p]) for p in points]), z["split"]),
        (f"19 linear probes together, {z['epochs']} epochs on {z['split']} images", probes, z["split"]),
        (f"19 numerical ranks of {z['split']} images (<= 8000 columns, float64)", ranks, z["split"]),
    ]
