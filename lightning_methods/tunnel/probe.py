"""The tunnel probe: per-layer linear probes and numerical ranks of one network, and the tunnel start.

Masarczyk et al., *The Tunnel Effect: Building Data Representations in Deep Neural Networks*, NeurIPS 2023,
arXiv 2305.19753. For every probe point (``tunnel.points``) the probe

1. extracts the features of a seeded subset of the training split and of the test split, **one forward pass per
   batch for all points** (``analysis.features``; eval mode, no augmentation, host storage in fp32/fp16/bf16,
   optional pooling to <= ``pool_size`` x ``pool_size``);
2. trains the linear probes on the device (``analysis.linear_probe``: L-BFGS to convergence, or the reimplementation's
   Adam 1e-3, batch 512, 30 epochs) and
   reports their test accuracy;
3. computes the numerical rank of the test features (``analysis.rank``; eigenvalues > 1e-3 x the largest, at most
   8000 seeded columns);
4. optionally repeats 1-2 on an OOD class subset (``tunnel.data``) and reports where OOD accuracy peaks.

Splits are processed one after the other and freed, so the peak host memory of the features is
``max_split(n_split) * sum_l(d_l) * bytes_per_element`` (checked against ``memory_budget_gb`` before any pass).

Under DDP every rank extracts its shard of each split (``sharded_loader``), features are gathered by sample index
without the padding duplicates (``gather_by_index``), layer ``l`` is probed on rank ``l mod world_size`` only, and
the results are combined and broadcast from rank 0: every rank ends with the same table as one process would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_methods.analysis.features import (
    FeatureSet,
    ProbePoint,
    check_feature_memory,
    extract_features,
    feature_dims,
    seeded_subset,
)
from lightning_methods.analysis.linear_probe import probe_accuracy, train_linear_probes
from lightning_methods.analysis.rank import numerical_rank
from lightning_methods.datamodules import collate_dict
from lightning_methods.tunnel.data import ProbeData, subset
from lightning_methods.tunnel.detect import TUNNEL_START_DEFINITION, elbow, ood_retained, tunnel_start, tunnel_strength
from lightning_methods.tunnel.points import probe_points
from lightning_methods.tunnel.report import TunnelReport
from lightning_methods.tunnel.settings import ProbeSettings
from lightning_methods.utils import (
    broadcast_object,
    gather_by_index,
    get_rank,
    get_world_size,
    is_distributed,
    mix_seed,
    sharded_loader,
)

SPLIT_KEYS = {"id_train": 1, "id_test": 2, "ood_train": 3, "ood_test": 4}


class _Counter:
    """Wraps the forward callable and counts its calls (the report's ``forward_passes``)."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x: torch.Tensor) -> Any:
        self.calls += 1
        return self.fn(x)


class TunnelProber:
    """Runs the probe of one network (see the module docstring).

    Args:
        settings: a :class:`ProbeSettings`.
    """

    def __init__(self, settings: ProbeSettings | None = None) -> None:
        self.settings = settings or ProbeSettings()

    def points(self, backbone: nn.Module) -> list[ProbePoint]:
        """The probe points of ``backbone`` in forward order."""
        return probe_points(backbone, self.settings.points, self.settings.include_head)

    # ------------------------------------------------------------------------------------------------ sizes
    def split_sizes(self, id_data: ProbeData, ood_data: ProbeData | None = None) -> dict[str, int]:
        s = self.settings
        sizes = {"id_train": min(len(id_data.train), s.max_train_samples or len(id_data.train)),
                 "id_test": min(len(id_data.test), s.max_test_samples or len(id_data.test))}
        if ood_data is not None:
            sizes["ood_train"] = min(len(ood_data.train), s.max_train_samples or len(ood_data.train))
            sizes["ood_test"] = min(len(ood_data.test), s.max_test_samples or len(ood_data.test))
        return sizes

    def check_memory(self, backbone: nn.Module, points: Sequence[ProbePoint], id_data: ProbeData,
                     ood_data: ProbeData | None, prepare: Callable, forward: Callable | None = None
                     ) -> tuple[dict[str, int], int]:
        """Feature sizes of every point and the estimated peak host bytes; raises ``MemoryError`` over budget."""
        loader = torch.utils.data.DataLoader(subset(id_data.test, torch.arange(min(2, len(id_data.test)))),
                                             batch_size=2, collate_fn=collate_dict)
        dims = feature_dims(backbone, points, prepare(next(iter(loader))), self.settings.pool_size, forward)
        n = max(self.split_sizes(id_data, ood_data).values())
        est = check_feature_memory(dims, n, self.settings.feature_dtype, self.settings.memory_budget_gb,
                                   "the tunnel-probe features of the largest split")
        return dims, est

    # ------------------------------------------------------------------------------------------------ passes
    def _features(self, backbone: nn.Module, points: Sequence[ProbePoint], dataset: torch.utils.data.Dataset,
                  split: str, prepare: Callable, forward: _Counter, context: Callable | None, owned: set[str],
                  device: torch.device, stats: dict[str, Any]) -> FeatureSet:
        s = self.settings
        limit = s.max_train_samples if split.endswith("train") else s.max_test_samples
        pos = seeded_subset(len(dataset), limit, mix_seed(s.seed, SPLIT_KEYS[split]))
        loader = sharded_loader(subset(dataset, pos), s.extract_batch_size, collate_fn=collate_dict)
        n_local = len(loader.sampler) if loader.sampler is not None else len(pos)
        calls, t0 = forward.calls, time.perf_counter()
        fs = extract_features(
            backbone,
            points,
            loader,
            n_samples=n_local,
            prepare=prepare,
            forward=forward,
            pool_size=s.pool_size,
            dtype=s.feature_dtype,
            context=context,
        )
        stats["forward_passes"][split] = forward.calls - calls
        stats["batches"][split] = len(loader)
        stats["samples"][split] = len(pos)
        fs = _gather_owned(fs, owned, device)
        stats["seconds"][f"extract_{split}"] = time.perf_counter() - t0
        return fs

    def _train_probes(self, train: FeatureSet, num_classes: int, device: torch.device) -> dict:
        s = self.settings
        feats = train.features
        if sum(f.numel() * f.element_size() for f in feats.values()) <= s.device_cache_gb * 2**30:
            feats = {k: v.to(device) for k, v in feats.items()}
        return train_linear_probes(feats, train.targets, num_classes, solver=s.probe_solver, epochs=s.probe_epochs,
                                   batch_size=s.probe_batch_size, lr=s.probe_lr, weight_decay=s.probe_weight_decay,
                                   max_iter=s.probe_max_iter, tol=s.probe_tol, seed=s.seed, device=device)

    # ------------------------------------------------------------------------------------------------ run
    def run(self, backbone: nn.Module, id_data: ProbeData, prepare: Callable[[Mapping], torch.Tensor],
            ood_data: ProbeData | None = None, device: torch.device | str | None = None,
            forward: Callable[[torch.Tensor], Any] | None = None,
            context: Callable[[], contextlib.AbstractContextManager] | None = None,
            meta: Mapping[str, Any] | None = None, points: Sequence[ProbePoint] | None = None) -> TunnelReport:
        """Probe ``backbone`` on ``id_data`` (and ``ood_data``); returns the same report on every rank.

        Args:
            backbone: the network whose modules are hooked.
            id_data: in-distribution train/test sets (``tunnel.data.datamodule_data``).
            prepare: batch -> normalized input on the device (``tunnel.data.image_preparer``).
            ood_data: an OOD class subset (``tunnel.data.class_subset``) or None.
            device: where the probes and ranks are computed (default: the backbone's device).
            forward: what is called on the input (default: ``backbone``; e.g. the LightningModule).
            context: factory of a context manager around each forward (e.g. the trainer's precision).
            meta: extra summary entries (epoch, checkpoint, dataset names, ...).
            points: the probe points (default: :meth:`points`).

        Raises:
            MemoryError: the features would exceed ``memory_budget_gb`` (before any pass).
        """
        s = self.settings
        device = torch.device(device) if device is not None else next(backbone.parameters()).device
        points = list(points) if points is not None else self.points(backbone)
        dims, est = self.check_memory(backbone, points, id_data, ood_data=ood_data, prepare=prepare, forward=forward)
        world, rank = get_world_size(), get_rank()
        owned = {p.name for i, p in enumerate(points) if i % world == rank}
        counter = _Counter(forward or backbone)
        stats: dict[str, Any] = {"forward_passes": {}, "batches": {}, "samples": {}, "seconds": {}}
        results: dict[str, dict[str, Any]] = {p.name: {} for p in points if p.name in owned}
        rank_dtype = torch.float64 if s.rank_dtype == "float64" else torch.float32
        runs = [("id", id_data)] + ([("ood", ood_data)] if ood_data is not None else [])
        common = dict(prepare=prepare, forward=counter, context=context, owned=owned, device=device, stats=stats)
        for tag, data in runs:
            train = self._features(backbone, points, data.train, split=f"{tag}_train", **common)
            t0 = time.perf_counter()
            probes = self._train_probes(train, data.num_classes, device) if owned else {}
            for name, probe in probes.items():
                results[name][f"train_acc_{tag}"] = probe.train_acc
            del train
            stats["seconds"][f"probes_{tag}"] = time.perf_counter() - t0
            test = self._features(backbone, points, data.test, split=f"{tag}_test", **common)
            for name, acc in probe_accuracy(probes, test.features, test.targets).items():
                results[name][f"acc_{tag}"] = acc
            if tag == "id":
                t0 = time.perf_counter()
                for name in results:
                    results[name]["rank"] = numerical_rank(
                        test.features[name],
                        s.rank_rtol,
                        s.rank_max_columns,
                        s.rank_mode,
                        seed=s.seed,
                        dtype=rank_dtype,
                        device=device,
                    )
                stats["seconds"]["rank"] = time.perf_counter() - t0
            del test, probes
        results = _merge(results)
        report = self._report(
            points, dims, results, id_data=id_data, ood_data=ood_data, stats=stats, est=est, meta=meta
        )
        return broadcast_object(report)

    def _report(self, points: Sequence[ProbePoint], dims: dict[str, int], results: dict[str, dict[str, Any]],
                id_data: ProbeData, ood_data: ProbeData | None, stats: dict[str, Any], est: int,
                meta: Mapping[str, Any] | None) -> TunnelReport:
        s = self.settings
        acc = [results[p.name]["acc_id"] for p in points]
        start = tunnel_start(acc, s.tunnel_threshold)
        rows = []
        for i, p in enumerate(points):
            r = results[p.name]
            rows.append({"layer": i + 1, "name": p.name, "module": p.module + (f":{p.activation}" if p.activation
                                                                                 else ""),
                         "dim": dims[p.name], "acc_id": r["acc_id"], "train_acc_id": r["train_acc_id"],
                         "acc_ood": r.get("acc_ood"), "train_acc_ood": r.get("train_acc_ood"), "rank": r["rank"],
                         "rank_per_class": r["rank"] / id_data.num_classes, "in_tunnel": i >= start})
        bend = elbow(acc)
        summary: dict[str, Any] = {
            "tunnel_start_layer": start + 1, "tunnel_start_name": points[start].name,
            "tunnel_length": len(points) - start, "num_layers": len(points),
            "definition": TUNNEL_START_DEFINITION.format(threshold=s.tunnel_threshold),
            "elbow_layer": None if bend is None else bend + 1,
            "elbow_definition": "layer with the most negative second difference of the ID probe accuracy",
            "num_classes": id_data.num_classes, "id_data": id_data.name, "best_acc_id": max(acc),
            "last_rank": rows[-1]["rank"], "min_rank": min(r["rank"] for r in rows),
            "settings": asdict(s), "feature_bytes_peak_estimate": est, "world_size": get_world_size(), **stats,
        }
        if ood_data is not None:
            ood = [results[p.name]["acc_ood"] for p in points]
            peak = max(range(len(ood)), key=lambda i: (ood[i], -i))
            retained = ood_retained(ood)
            summary.update({"ood_data": ood_data.name, "ood_classes": ood_data.classes, "ood_peak_layer": peak + 1,
                            "ood_peak_name": points[peak].name, "ood_retained_pct": retained,
                            "tunnel_strength": tunnel_strength(retained)})
        summary.update(dict(meta or {}))
        return TunnelReport(rows, summary)


def _gather_owned(fs: FeatureSet, owned: set[str], device: torch.device) -> FeatureSet:
    """Under DDP: gather every point's features by sample index (no padding duplicates) one point at a time and
    keep only the owned points; without DDP: keep the owned points (rows are already sorted and unique)."""
    if not is_distributed():
        return FeatureSet({k: v for k, v in fs.features.items() if k in owned}, fs.targets, fs.index)
    dev = device if dist.get_backend() != "gloo" else torch.device("cpu")
    idx = fs.index.to(dev)
    index, targets = gather_by_index(idx, fs.targets.to(dev))
    feats = {}
    for name in list(fs.features):
        _, g = gather_by_index(idx, fs.features.pop(name).to(dev))
        if name in owned:
            feats[name] = g.cpu()
        del g
    return FeatureSet(feats, targets.cpu(), index.cpu())


def _merge(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Combine every rank's per-layer results (each layer is probed on one rank)."""
    if not is_distributed():
        return results
    parts: list[Any] = [None] * get_world_size()
    dist.all_gather_object(parts, results)
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        merged.update(part)
    return merged
