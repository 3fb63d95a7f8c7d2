"""Partitioners: class counts, conservation, disjoint seeded 75/25 splits, HtFLlib golden partitions, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_methods.federated.partition import SCHEMES, PartitionSettings, make_client_split

TRAIN = np.repeat(np.arange(20), 30)  # 600 samples, 20 classes
TEST = np.repeat(np.arange(20), 10)


def split_of(train, test, num_classes=20, seed=0, **settings):
    """``make_client_split`` with the partition settings given as keywords."""
    return make_client_split(train, test, PartitionSettings(**settings), num_classes=num_classes, seed=seed)


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_sample_exactly_once(scheme, merge):
    split = split_of(TRAIN, TEST, num_clients=6, scheme=scheme, classes_per_client=5, alpha=0.5, merge=merge, seed=3)
    used = np.concatenate(split.train + split.test)
    assert len(used) == len(np.unique(used))  # disjoint across clients and across local train / test
    if scheme != "htfl_pathological":  # HtFLlib's scheme leaves classes no client still needs unassigned
        assert sorted(used.tolist()) == list(range(len(TRAIN) + len(TEST)))
    if not merge:
        assert all(t.max() < len(TRAIN) for t in split.train)
        assert all(t.min() >= len(TRAIN) for t in split.test if len(t))


def test_pathological_gives_exactly_c_classes_and_test_follows_train():
    for clients, c in [(6, 5), (20, 10), (7, 3)]:
        split = split_of(TRAIN, TEST, num_clients=clients, classes_per_client=c, seed=1)
        labels = np.concatenate([TRAIN, TEST])
        for tr, te in zip(split.train, split.test):
            assert len(np.unique(labels[tr])) == c
            assert set(np.unique(labels[te])) <= set(np.unique(labels[tr]))
        counts = np.bincount(np.concatenate([np.unique(labels[t]) for t in split.train]), minlength=20)
        assert counts.max() - counts.min() <= 1  # every class held by (nearly) the same number of clients


def test_pathological_shares_are_pfedhn_like():
    split = split_of(np.repeat(np.arange(10), 1000), np.repeat(np.arange(10), 100), num_classes=10, num_clients=10,
                     classes_per_client=2, seed=0)
    labels = np.repeat(np.arange(10), 1000)
    for k in range(10):
        holders = [len(np.flatnonzero(labels[t] == k)) for t in split.train]
        held = sorted(h for h in holders if h)
        assert len(held) == 2 and sum(held) == 1000 and 400 <= held[0] <= 500  # U(0.4, 0.6) normalised


def test_local_split_is_disjoint_seeded_and_75_25():
    a = split_of(TRAIN, TEST, num_clients=4, scheme="dirichlet", alpha=1.0, merge=True, seed=5)
    b = split_of(TRAIN, TEST, num_clients=4, scheme="dirichlet", alpha=1.0, merge=True, seed=5)
    c = split_of(TRAIN, TEST, num_clients=4, scheme="dirichlet", alpha=1.0, merge=True, seed=6)
    for tr, te, tr2 in zip(a.train, a.test, b.train):
        assert not set(tr) & set(te)
        assert len(te) == int(np.ceil(0.25 * (len(tr) + len(te))))
        assert np.array_equal(tr, tr2)
    assert any(not np.array_equal(x, y) for x, y in zip(a.train, c.train))


# HtFLlib / PFLlib ``separate_data`` + ``split_data`` run with np.random.seed(1) on labels (7 i) % 10, i < 600,
# content = arange(600) (numbers recorded from the official code; per client: length and first three positions).
GOLDEN = {
    "dir": dict(kw=dict(num_clients=5, scheme="dirichlet", alpha=0.1),
                train=([70, 93, 89, 101, 95], [[52, 322, 22], [63, 280, 570], [277, 128, 77], [253, 234, 254],
                                               [19, 139, 15]]),
                test=([24, 32, 30, 34, 32], [[402, 72, 182], [556, 490, 190], [417, 397, 528], [64, 391, 404],
                                             [535, 255, 120]])),
    "pat": dict(kw=dict(num_clients=10, scheme="htfl_pathological", classes_per_client=4),
                train=([45] * 10, [[66, 63, 100], [229, 210, 203], [386, 426, 389], [479, 466, 566],
                                   [128, 111, 132], [238, 268, 278], [305, 421, 312], [548, 475, 565], [74, 107, 14],
                                   [414, 457, 474]]),
                test=([15] * 10, [[96, 116, 20], [283, 286, 259], [443, 416, 440], [579, 499, 559], [112, 135, 98],
                                  [198, 211, 248], [408, 402, 438], [458, 552, 595], [284, 7, 294],
                                  [324, 454, 314]])),
    "pat_unbal": dict(kw=dict(num_clients=10, scheme="htfl_pathological", classes_per_client=4, balance=False),
                      train=([24, 30, 26, 99, 24, 21, 30, 102, 34, 55],
                             [[49, 19, 50], [189, 109, 123], [323, 313, 269], [156, 376, 446], [21, 58, 81],
                              [72, 178, 181], [185, 188, 221], [555, 305, 405], [217, 187, 7], [534, 447, 547]]),
                      test=([9, 10, 9, 33, 9, 8, 11, 35, 12, 19],
                            [[33, 103, 20], [153, 36, 223], [279, 303, 250], [409, 560, 389], [18, 51, 5],
                             [62, 168, 52], [205, 175, 211], [212, 415, 542], [24, 104, 117], [577, 284, 434]])),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_matches_htfllib_partitions(name):
    labels = np.array([(i * 7) % 10 for i in range(600)])
    g = GOLDEN[name]
    split = split_of(labels, np.zeros(0, np.int64), num_classes=10, merge=True, seed=1, **g["kw"])
    assert [len(t) for t in split.train] == g["train"][0] and [t[:3].tolist() for t in split.train] == g["train"][1]
    assert [len(t) for t in split.test] == g["test"][0] and [t[:3].tolist() for t in split.test] == g["test"][1]


def test_statistics_are_counts_per_client():
    split = split_of(TRAIN, TEST, num_clients=4, classes_per_client=5, seed=0)
    stats = split.statistics(np.concatenate([TRAIN, TEST]), 20)
    assert [s["train"] for s in stats] == [len(t) for t in split.train]
    assert all(len(s["classes"]) == 5 and sum(s["train_per_class"].values()) == s["train"] for s in stats)


def test_bad_input_stops_with_clear_messages():
    with pytest.raises(ValueError, match="classes_per_client=21 is impossible: the data set has 20 classes"):
        split_of(TRAIN, TEST, num_clients=4, classes_per_client=21)
    with pytest.raises(ValueError, match="Dirichlet alpha must be > 0, got 0"):
        split_of(TRAIN, TEST, num_clients=4, scheme="dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="fewer samples than clients"):
        split_of(TRAIN[:5], TEST, num_clients=6, scheme="iid")
    with pytest.raises(ValueError, match="unknown partition 'shards'"):
        split_of(TRAIN, TEST, num_clients=4, scheme="shards")
    with pytest.raises(ValueError, match="no draw in"):
        split_of(TRAIN, TEST, num_clients=4, scheme="dirichlet", alpha=0.01, min_samples=500)
