"""Label-noise generators (datamodules/noisy_labels.py): rates, transition structure, seeding, the official random
stream, and the CIFAR-N reader."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_methods.datamodules.label_noise import (
    CIFAR10_ASYM_MAP,
    cifar100_groups,
    group_cyclic_transition,
    instance_noise,
    make_noisy_labels,
    pairflip_transition,
    read_cifarn_labels,
    symmetric_transition,
)

N, C = 50_000, 100
CLEAN = np.arange(N) % C


def test_symmetric_noise_rate_and_flips_never_keep_the_label():
    P = symmetric_transition(C, 0.4)
    assert np.allclose(P.sum(1), 1.0) and np.allclose(np.diag(P), 0.6)
    noisy = make_noisy_labels(CLEAN, "sym", 0.4, C, seed=1)
    flipped = noisy != CLEAN
    assert abs(flipped.mean() - 0.4) < 0.01  # a flip never lands on the true class: the rate is r, not r(C-1)/C
    # flipped labels are spread uniformly over the other classes: offsets 1..C-1 equally often
    offsets = (noisy[flipped] - CLEAN[flipped]) % C
    assert offsets.min() >= 1
    counts = np.bincount(offsets, minlength=C)[1:]
    assert stats.chisquare(counts).pvalue > 1e-4


def test_include_noise_rescales_the_rate():
    clean = np.arange(20_000) % 10
    plain = (make_noisy_labels(clean, "sym", 0.4, 10, seed=3) != clean).mean()
    included = (make_noisy_labels(clean, "sym", 0.4, 10, seed=3, include_noise=True) != clean).mean()
    assert abs(plain - 0.4) < 0.015 and abs(included - 0.36) < 0.015


def test_pairflip_maps_only_i_to_i_plus_1():
    P = pairflip_transition(C, 0.4)
    assert np.allclose(P.sum(1), 1.0)
    noisy = make_noisy_labels(CLEAN, "pairflip", 0.4, C, seed=1)
    flipped = noisy != CLEAN
    assert abs(flipped.mean() - 0.4) < 0.01
    assert np.array_equal(noisy[flipped], (CLEAN[flipped] + 1) % C)


def test_asymmetric_groups_and_class_map():
    groups = cifar100_groups("consecutive5")
    noisy = make_noisy_labels(CLEAN, "asym", 0.4, C, seed=2, asym_groups=groups)
    flipped = noisy != CLEAN
    assert abs(flipped.mean() - 0.4) < 0.01
    src, dst = CLEAN[flipped], noisy[flipped]
    assert np.array_equal(dst // 5, src // 5)  # stays in its group of 5 ...
    assert np.array_equal(dst, src // 5 * 5 + (src % 5 + 1) % 5)  # ... and moves to the next class, cyclically

    # superclasses from coarse labels: a permuted (non-consecutive) grouping like the real CIFAR-100 one
    perm = np.random.default_rng(0).permutation(C)
    coarse = perm[CLEAN] // 5
    sgroups = cifar100_groups("superclass", coarse, CLEAN)
    assert len(sgroups) == 20 and all(len(g) == 5 and g == sorted(g) for g in sgroups)
    noisy = make_noisy_labels(CLEAN, "asym", 0.4, C, seed=2, asym_groups=sgroups)
    flipped = noisy != CLEAN
    assert np.array_equal(perm[noisy[flipped]] // 5, perm[CLEAN[flipped]] // 5)
    nxt = {g[j]: g[(j + 1) % 5] for g in sgroups for j in range(5)}
    assert all(nxt[s] == d for s, d in zip(CLEAN[flipped], noisy[flipped]))

    clean10 = np.arange(20_000) % 10
    noisy10 = make_noisy_labels(clean10, "asym", 0.4, 10, seed=2, asym_map=CIFAR10_ASYM_MAP)
    flipped10 = noisy10 != clean10
    assert set(np.unique(clean10[flipped10])) == set(CIFAR10_ASYM_MAP)
    assert all(CIFAR10_ASYM_MAP[s] == d for s, d in zip(clean10[flipped10], noisy10[flipped10]))
    assert abs(flipped10.mean() - 0.4 * 5 / 10) < 0.015
    with pytest.raises(ValueError, match="overlap"):
        group_cyclic_transition(10, 0.2, [[0, 1], [1, 2]])


def _instance_reference(images: np.ndarray, labels: np.ndarray, rate: float, num_classes: int, seed: int):
    """Independent PTD reference: one big W draw and ``RandomState.choice`` per sample, as the official loop does."""
    rng = np.random.RandomState(seed)
    q = stats.truncnorm(-rate / 0.1, (0.6 - rate) / 0.1, loc=rate, scale=0.1).rvs(len(labels), random_state=rng)
    x = images.reshape(len(labels), -1).astype(np.float32)
    W = rng.randn(num_classes, x.shape[1], num_classes).astype(np.float32)
    out, argmax_other = [], []
    for i, y in enumerate(labels):
        a = (x[i] @ W[y]).astype(np.float64)
        a[y] = -np.inf
        p = np.exp(a - a.max())
        p = q[i] * p / p.sum()
        p[y] += 1 - q[i]
        argmax_other.append(int(np.argmax(a)))
        out.append(rng.choice(num_classes, p=p.astype(np.float32)))
    return np.array(out), np.array(argmax_other), q


def test_instance_noise_draws_every_class_projection_even_for_an_absent_class():
    """The official stream draws ``W`` for all classes (one ``C x D x C`` normal block) whether or not a class occurs:
    a data set without class 3 gives the labels of that reference, not of a stream that skips ``W[3]``."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (300, 2, 2, 3), dtype=np.uint8)
    labels = rng.choice([0, 1, 2, 4, 5], 300)
    got = instance_noise(images, labels, 0.4, 6, seed=9)
    assert np.array_equal(got, _instance_reference(images, labels, 0.4, 6, seed=9)[0])
    assert (got != labels).any() and 3 not in set(labels.tolist())


def test_instance_noise_matches_the_official_stream_and_rate():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1500, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 1500)
    noisy = instance_noise(images, labels, 0.4, 10, seed=5)
    ref, wrong_target, q = _instance_reference(images, labels, 0.4, 10, seed=5)
    assert np.array_equal(noisy, ref)
    flipped = noisy != labels
    # raw pixels make softmax(A) nearly one-hot: a flipped sample goes to its near-deterministic wrong class
    assert (noisy[flipped] == wrong_target[flipped]).mean() > 0.98
    truncated_mean = stats.truncnorm(-4, 2, loc=0.4, scale=0.1).mean()  # truncation at 0.6 lowers the mean rate
    assert truncated_mean < 0.4
    assert abs(flipped.mean() - truncated_mean) < 0.04

    big_images = rng.integers(0, 256, (20_000, 2, 2, 3), dtype=np.uint8)
    big_labels = rng.integers(0, 10, 20_000)
    rate = (instance_noise(big_images, big_labels, 0.2, 10, seed=1) != big_labels).mean()
    assert abs(rate - stats.truncnorm(-2, 4, loc=0.2, scale=0.1).mean()) < 0.01


@pytest.mark.parametrize("noise_type", ["sym", "pairflip", "asym", "instance"])
def test_same_seed_same_labels(noise_type):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3000, 2, 2, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 3000)
    a = make_noisy_labels(labels, noise_type, 0.4, 10, seed=7, images=images)
    b = make_noisy_labels(labels, noise_type, 0.4, 10, seed=7, images=images)
    c = make_noisy_labels(labels, noise_type, 0.4, 10, seed=8, images=images)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cifarn_reader(tmp_path):
    clean = np.arange(500) % 10
    noisy = (clean + (np.arange(500) % 3 == 0)) % 10
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save({"clean_label": clean, "worse_label": noisy, "aggre_label": clean}, path)
    assert np.array_equal(read_cifarn_labels(path, "worse_label", clean), noisy)
    assert np.array_equal(make_noisy_labels(clean, "cifarn", 0.0, 10, 0, cifarn_file=path, cifarn_key="worse_label"),
                          noisy)
    with pytest.raises(KeyError, match="random_label1"):
        read_cifarn_labels(path, "random_label1", clean)
    with pytest.raises(ValueError, match="clean_label differs"):
        read_cifarn_labels(path, "worse_label", (clean + 1) % 10)
    with pytest.raises(FileNotFoundError, match="cifar-10-100n"):
        read_cifarn_labels(tmp_path / "missing.pt", "worse_label")
    torch.save({"noisy_label": noisy, "extra": datetime.date(2020, 1, 1)}, tmp_path / "bad.pt")  # non-numpy global
    with pytest.raises(ValueError, match="not a CIFAR-N label file"):
        read_cifarn_labels(tmp_path / "bad.pt", "noisy_label")
