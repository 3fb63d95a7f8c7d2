"""Feature extraction (one forward pass per batch for all points, pooling, fp16 storage, restored train/eval flags),
seeded subsets, the memory budget, and the prober's report on small synthetic data (incl. the OOD class subset)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lightning_methods.analysis.features import (
    ProbePoint,
    check_feature_memory,
    extract_features,
    feature_dims,
    seeded_subset,
)
from lightning_methods.datamodules import IndexedTensorDataset
from lightning_methods.models import create_backbone
from lightning_methods.tunnel import ProbeData, ProbeSettings, TunnelProber, class_subset, select_classes
from lightning_methods.tunnel.data import image_preparer, subset

STATS = SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3)  # a DataModule's normalization


def batches(x: torch.Tensor, size: int):
    for s in range(0, len(x), size):
        yield {"image": x[s : s + size], "target": torch.zeros(len(x[s : s + size]), dtype=torch.long),
               "index": torch.arange(s, s + len(x[s : s + size]))}


def test_one_pass_for_all_points_matches_the_layers(one_thread):
    model = create_backbone("mlp", 10, depth=4, width=16)
    model.train()
    model.layers[1].eval()  # a deliberately frozen submodule keeps its flag
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    points = [ProbePoint(f"fc{i + 1}", f"layers.{i}.act") for i in range(3)] + [ProbePoint("fc4", "head")]
    x = torch.randn(10, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fs = extract_features(model, points, batches(x, 4), 10)
    assert len(calls) == 3  # ceil(10 / 4) batches, one forward each, for all four points
    assert model.training and not model.layers[1].training and model.layers[0].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    h = x.flatten(1)
    for i in range(3):
        h = F.relu(model.layers[i].linear(h))
        torch.testing.assert_close(fs.features[f"fc{i + 1}"], h.detach())
    torch.testing.assert_close(fs.features["fc4"], model.head(h).detach())
    assert torch.equal(fs.index, torch.arange(10)) and not fs.features["fc1"].requires_grad


def test_pooling_and_half_precision_storage(one_thread):
    model = create_backbone("vgg19_3fc", 10)
    points = [ProbePoint("conv1", "features.0.act"), ProbePoint("conv13", "features.17.act")]
    dims = feature_dims(model, points, torch.zeros(1, 3, 32, 32), pool_size=4)
    assert dims == {"conv1": 64 * 4 * 4, "conv13": 512 * 2 * 2}  # 32x32 pooled to 4x4; 2x2 maps stay
    assert feature_dims(model, points, torch.zeros(1, 3, 32, 32)) == {"conv1": 64 * 32 * 32, "conv13": 512 * 2 * 2}
    x = torch.randn(3, 3, 32, 32)
    full = extract_features(model, points, batches(x, 3), 3)
    pooled = extract_features(model, points, batches(x, 3), 3, pool_size=4, dtype="float16")
    assert pooled.features["conv1"].dtype == torch.float16
    expected = F.adaptive_avg_pool2d(full.features["conv1"].view(3, 64, 32, 32), 4).flatten(1)
    torch.testing.assert_close(pooled.features["conv1"].float(), expected, rtol=2e-3, atol=2e-3)


def test_seeded_subsets_are_deterministic():
    a = seeded_subset(1000, 100, seed=3)
    assert torch.equal(a, seeded_subset(1000, 100, seed=3)) and torch.equal(a, a.sort().values)
    assert len(a.unique()) == 100 and not torch.equal(a, seeded_subset(1000, 100, seed=4))
    assert torch.equal(seeded_subset(50, None, 0), torch.arange(50)) and len(seeded_subset(50, 80, 0)) == 50


def test_memory_budget_names_the_size_and_the_options():
    dims = {"conv1": 65536, "fc": 10}
    with pytest.raises(MemoryError) as err:
        check_feature_memory(dims, 50000, "float32", budget_gb=8)
    msg = str(err.value)
    assert "12.2 GiB" in msg and "'conv1': 65536" in msg
    assert all(opt in msg for opt in ("pool_size=4", "max_train_samples", "feature_dtype='float16'", "points="))
    assert check_feature_memory(dims, 10000, "float16", budget_gb=16) == 10000 * 65546 * 2


def synthetic(n: int, classes: int, seed: int) -> IndexedTensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 60 + y[:, None, None, None] * 18).to(torch.uint8)
    return IndexedTensorDataset(x, y)


def test_prober_report_forward_passes_and_ood(one_thread):
    model = create_backbone("mlp", 4, depth=4, width=16)
    data = ProbeData("toy", synthetic(60, 4, 0), synthetic(30, 4, 1), 4)
    ood = class_subset(ProbeData("toy10", synthetic(80, 10, 2), synthetic(40, 10, 3), 10), 3, seed=0)
    assert ood.classes == select_classes(10, 3, 0) and ood.num_classes == 3
    assert int(ood.train.targets.max()) == 2  # relabelled 0 .. k-1
    settings = ProbeSettings(max_train_samples=50, probe_epochs=2, extract_batch_size=16, ood_classes=3)
    report = TunnelProber(settings).run(model, data, image_preparer(STATS, torch.device("cpu")),
                                        ood)
    s = report.summary
    assert [r["layer"] for r in report.rows] == [1, 2, 3, 4] and report.rows[-1]["dim"] == 4
    assert s["samples"] == {"id_train": 50, "id_test": 30, "ood_train": len(ood.train), "ood_test": len(ood.test)}
    assert s["forward_passes"] == s["batches"] == {"id_train": 4, "id_test": 2, "ood_train": 2, "ood_test": 1}
    assert all(0 <= r["acc_ood"] <= 1 and r["rank"] <= 16 for r in report.rows)
    assert s["tunnel_start_layer"] == 1 + [r["in_tunnel"] for r in report.rows].index(True)
    assert s["ood_peak_layer"] in (1, 2, 3, 4) and s["settings"]["max_train_samples"] == 50
    assert report.rows[0]["rank_per_class"] == report.rows[0]["rank"] / 4


def test_prober_stops_before_any_pass_over_budget(one_thread):
    model = create_backbone("vgg19_3fc", 10)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    data = ProbeData("toy", synthetic(40, 10, 0), synthetic(20, 10, 1), 10)
    settings = ProbeSettings(memory_budget_gb=0.01, feature_dtype="float32")
    with pytest.raises(MemoryError, match=r"46\.4 MiB .*\(40 samples x 304138 features over 19 probe points"):
        TunnelProber(settings).run(model, data, image_preparer(STATS, torch.device("cpu")))
    assert len(calls) <= 2  # the order check and the feature-size pass only: no extraction


def test_bad_ood_classes():
    with pytest.raises(ValueError, match="ood_classes=20 asks for more classes than CIFAR-10 has \\(10\\)"):
        select_classes(10, 20, dataset="CIFAR-10")
    with pytest.raises(ValueError, match="distinct"):
        select_classes(10, [1, 1])
    with pytest.raises(ValueError, match="out of range: \\[12\\]"):
        select_classes(10, [3, 12])
    assert select_classes(100, [7, 3]) == [7, 3] and select_classes(10, None) == list(range(10))


def test_probe_data_never_applies_the_worker_augmentation(one_thread):
    """Spec (integration notes): the probe reads images without augmentation. A DataModule with augment='autoaugment'
    or 'colorjitter' puts that augmentation on its train_set as a per-sample ``transform``; the probe's subsets must
    return the stored images exactly, also through the OOD class subset, and the prober's train features must equal
    the features of the stored images."""
    clean = synthetic(40, 4, 0)
    augmented = IndexedTensorDataset(clean.images, clean.targets, clean.indices, transform=lambda img: 255 - img)
    assert not torch.equal(augmented[0]["image"], clean.images[0])  # the transform does change the images
    pos = torch.tensor([3, 0, 17, 39])
    for ds in (subset(augmented, pos), class_subset(ProbeData("aug", augmented, augmented, 4), [2, 1]).train):
        items = [ds[i] for i in range(len(ds))]
        index = torch.stack([it["index"] for it in items])
        assert torch.equal(torch.stack([it["image"] for it in items]), clean.images[index])
    model = create_backbone("mlp", 4, depth=2, width=8)
    settings = ProbeSettings(max_train_samples=None, probe_epochs=1, probe_solver="adam", extract_batch_size=16)
    prep = image_preparer(STATS, torch.device("cpu"))
    reports = [TunnelProber(settings).run(model, ProbeData("toy", train, synthetic(20, 4, 1), 4), prep)
               for train in (clean, augmented)]
    assert [r["train_acc_id"] for r in reports[0].rows] == [r["train_acc_id"] for r in reports[1].rows]
    assert [r["acc_id"] for r in reports[0].rows] == [r["acc_id"] for r in reports[1].rows]
