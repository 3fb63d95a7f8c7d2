"""Seeded label-skew partitioners for federated learning, with per-client statistics.

- ``pathological`` (FedFree's "non-IID1", following pFedHN, Shamsian et al. 2021, arXiv 2103.04628): every client
  holds exactly ``classes_per_client`` distinct classes, each class is held by (nearly) the same number of clients,
  and a class's samples are split among its holders in proportions drawn from U(0.4, 0.6) and normalised. pFedHN
  floors the per-client counts and drops the remainders; here every sample goes to exactly one client (largest
  remainder rounding, our choice), and a client never draws the same class twice.
- ``htfl_pathological``: HtFLlib / PFLlib's ``pat`` scheme (classes handed out in order, balanced shares).
- ``dirichlet``: HtFLlib's ``dir`` scheme: per class, Dirichlet(alpha) proportions with clients that already hold
  ``N / num_clients`` samples excluded, redrawn until every client has ``min_samples``.
- ``iid``: a seeded permutation cut into equal parts.

Local test sets: by default the train split is partitioned and the test split follows each client's label
distribution (per class, test samples go to clients in proportion to their train samples of that class, as pFedHN
does); ``merge=True`` reproduces HtFLlib (train and test are merged, partitioned, and every client's share is split
``train_fraction`` / rest into local train / test with a seeded shuffle).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

SCHEMES = ("pathological", "htfl_pathological", "dirichlet", "iid")
Scheme = Literal["pathological", "htfl_pathological", "dirichlet", "iid"]


@dataclass
class PartitionSettings:
    """How a data set is split across clients (the ``data.partition`` group of a ``lightning-methods-fed`` config).

    Args:
        num_clients: number of clients.
        scheme: ``"pathological"`` (FedFree's non-IID1, pFedHN-style), ``"htfl_pathological"`` (HtFLlib's ``pat``),
            ``"dirichlet"`` or ``"iid"``.
        classes_per_client: classes per client of the pathological schemes (FedFree: 1 on CIFAR-10, 10 on
            CIFAR-100).
        alpha: Dirichlet concentration (HtFLlib: 0.1).
        merge: HtFLlib's protocol: merge train and test, partition, split each client's share ``train_fraction`` /
            rest into local train / test. ``False``: partition the train split; local test sets follow each
            client's label distribution.
        train_fraction: local training share with ``merge`` (HtFLlib: 0.75).
        balance: equal class shares in ``htfl_pathological`` (HtFLlib's ``balance``).
        min_samples: smallest client share the Dirichlet scheme accepts; ``None`` = HtFLlib's
            ``min(40, N / num_clients / 2)``.
    """

    num_clients: int = 20
    scheme: Scheme = "pathological"
    classes_per_client: int = 10
    alpha: float = 0.1
    merge: bool = False
    train_fraction: float = 0.75
    balance: bool = True
    min_samples: int | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown partition {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")


@dataclass
class ClientSplit:
    """Per-client positions into the pool ``concat(train, test)`` of the source data set."""

    train: list[np.ndarray]
    test: list[np.ndarray]

    def statistics(self, labels: np.ndarray, num_classes: int) -> list[dict]:
        """Per client: sample counts, the classes held and per-class train/test counts (JSON-ready)."""
        out = []
        for i, (tr, te) in enumerate(zip(self.train, self.test)):
            ctr = np.bincount(labels[tr], minlength=num_classes)
            cte = np.bincount(labels[te], minlength=num_classes)
            out.append({"client": i, "train": int(len(tr)), "test": int(len(te)),
                        "classes": [int(c) for c in np.flatnonzero(ctr + cte)],
                        "train_per_class": {int(c): int(ctr[c]) for c in np.flatnonzero(ctr)},
                        "test_per_class": {int(c): int(cte[c]) for c in np.flatnonzero(cte)}})
        return out


def _split_counts(n: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n`` in proportion to ``shares`` (largest remainder)."""
    if shares.sum() <= 0:
        return np.zeros(len(shares), dtype=int)
    exact = shares / shares.sum() * n
    counts = np.floor(exact).astype(int)
    rest = n - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    return counts


def split_by_shares(labels: np.ndarray, shares: np.ndarray, rng: np.random.RandomState) -> list[np.ndarray]:
    """Deal every sample of class k to the clients in proportion to ``shares[:, k]`` (shuffled within the class).
    Samples of a class no client holds are dropped."""
    num_clients = shares.shape[0]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in range(shares.shape[1]):
        idx = np.flatnonzero(labels == k)
        idx = idx[rng.permutation(len(idx))]
        bounds = np.cumsum(_split_counts(len(idx), shares[:, k]))[:-1]
        for i, chunk in enumerate(np.split(idx, bounds)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def pathological_shares(num_clients: int, num_classes: int, classes_per_client: int, rng: np.random.RandomState,
                        low: float = 0.4, high: float = 0.6) -> np.ndarray:
    """pFedHN's class assignment: (clients x classes) shares, ``classes_per_client`` non-zero entries per row."""
    slots = classes_per_client * num_clients
    remaining = np.full(num_classes, slots // num_classes)
    remaining[rng.permutation(num_classes)[: slots % num_classes]] += 1
    if slots < num_classes:
        warnings.warn(f"{num_clients} clients x {classes_per_client} classes cover only {slots} of {num_classes} "
                      "classes: the samples of the other classes are unused", stacklevel=3)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for client in range(num_clients):
        mine: set[int] = set()
        for _ in range(classes_per_client):
            free = [k for k in range(num_classes) if k not in mine and remaining[k] > 0]
            if not free:  # only classes this client already holds are left: take any class it lacks
                free = [k for k in range(num_classes) if k not in mine]
                top = free
            else:
                top = [k for k in free if remaining[k] == max(remaining[f] for f in free)]
            k = int(rng.choice(top))
            mine.add(k)
            remaining[k] -= 1
            holders[k].append(client)
    shares = np.zeros((num_clients, num_classes))
    for k, hs in enumerate(holders):
        if hs:
            p = rng.uniform(low, high, size=len(hs))
            shares[hs, k] = p / p.sum()
    return shares


def htfl_pathological_parts(labels: np.ndarray, *, num_clients: int, num_classes: int, classes_per_client: int,
                            balance: bool, rng: np.random.RandomState, least_samples: int) -> list[np.ndarray]:
    """HtFLlib / PFLlib ``pat``: class i goes to the first ``ceil(num_clients / num_classes * c)`` clients that
    still need classes; balanced shares give each ``int(n / m)`` samples and the last one the rest."""
    need = [classes_per_client] * num_clients
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in range(num_classes):
        chosen = [c for c in range(num_clients) if need[c] > 0]
        if not chosen:
            break
        chosen = chosen[: int(np.ceil(num_clients / num_classes * classes_per_client))]
        idx = np.flatnonzero(labels == k)
        per = len(idx) / len(chosen)
        if balance:
            counts = [int(per)] * (len(chosen) - 1)
        else:
            counts = rng.randint(max(per / 10, least_samples / num_classes), per, len(chosen) - 1).tolist()
        counts.append(len(idx) - sum(counts))
        start = 0
        for c, n in zip(chosen, counts):
            parts[c].append(idx[start : start + n])
            start += n
            need[c] -= 1
    return [np.concatenate(p).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def dirichlet_parts(labels: np.ndarray, *, num_clients: int, num_classes: int, alpha: float,
                    rng: np.random.RandomState, min_samples: int, max_tries: int = 1000) -> list[np.ndarray]:
    """HtFLlib's capped per-class Dirichlet split (see the module docstring)."""
    n = len(labels)
    for _ in range(max_tries):
        batches: list[list[int]] = [[] for _ in range(num_clients)]
        for k in range(num_classes):
            idx = np.flatnonzero(labels == k)
            idx = idx[rng.permutation(len(idx))]
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * np.array([len(b) < n / num_clients for b in batches])
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for b, chunk in zip(batches, np.split(idx, cuts)):
                b.extend(chunk.tolist())
        if min(len(b) for b in batches) >= min_samples:
            return [np.asarray(b, dtype=np.int64) for b in batches]  # HtFLlib's order (class by class)
    raise ValueError(f"Dirichlet(alpha={alpha}) partition: no draw in {max_tries} tries gave every one of "
                     f"{num_clients} clients at least {min_samples} samples; raise alpha, lower num_clients or set "
                     "min_samples lower")


def shares_from_parts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(float)


def local_split(idx: np.ndarray, train_fraction: float, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """HtFLlib's per-client split (scikit-learn ``train_test_split(train_size=train_fraction, shuffle=True)``):
    one permutation, the first ``ceil((1 - train_fraction) * n)`` positions for test, the rest for training (in
    permutation order, which HtFLlib's unshuffled loaders keep)."""
    perm = idx[rng.permutation(len(idx))]
    n_test = int(np.ceil((1.0 - train_fraction) * len(idx)))
    return perm[n_test:], perm[:n_test]


def make_client_split(train_labels: np.ndarray, test_labels: np.ndarray, settings: PartitionSettings, *,
                      num_classes: int, seed: int = 0) -> ClientSplit:
    """Partition a data set across clients (see the module docstring).

    Args:
        train_labels, test_labels: int labels of the source train / test splits.
        settings: clients, scheme and its parameters (:class:`PartitionSettings`).
        num_classes: number of classes of the data set.
        seed: seed of every random choice.

    Returns:
        Per-client positions into ``concat(train, test)``.

    Raises:
        ValueError: for an unknown scheme, ``classes_per_client`` outside [1, num_classes], ``alpha <= 0``, fewer
            samples than clients, or a client left without training samples.
    """
    num_clients, scheme, classes_per_client = settings.num_clients, settings.scheme, settings.classes_per_client
    alpha, merge, train_fraction = settings.alpha, settings.merge, settings.train_fraction
    train_labels, test_labels = np.asarray(train_labels, np.int64), np.asarray(test_labels, np.int64)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if scheme.endswith("pathological") and not 1 <= classes_per_client <= num_classes:
        raise ValueError(f"classes_per_client={classes_per_client} is impossible: the data set has {num_classes} "
                         f"classes; choose 1..{num_classes}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    if merge and not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n_train = len(train_labels)
    labels = np.concatenate([train_labels, test_labels]) if merge else train_labels
    if len(labels) < num_clients:
        raise ValueError(f"{len(labels)} samples cannot be shared by {num_clients} clients (fewer samples than "
                         "clients); use fewer clients or more data")
    rng = np.random.RandomState(seed)  # legacy stream: same draws as HtFLlib / pFedHN for the same seed
    least = (settings.min_samples if settings.min_samples is not None
             else int(min(40, len(labels) / num_clients / 2)))
    shares = None
    if scheme == "pathological":
        shares = pathological_shares(num_clients, num_classes, classes_per_client, rng)
        parts = split_by_shares(labels, shares, rng)
    elif scheme == "htfl_pathological":
        parts = htfl_pathological_parts(labels, num_clients=num_clients, num_classes=num_classes,
                                        classes_per_client=classes_per_client, balance=settings.balance, rng=rng,
                                        least_samples=least)
    elif scheme == "dirichlet":
        parts = dirichlet_parts(labels, num_clients=num_clients, num_classes=num_classes, alpha=alpha, rng=rng,
                                min_samples=least)
    else:
        parts = [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(len(labels)), num_clients)]
    if merge:
        train, test = zip(*(local_split(p, train_fraction, rng) for p in parts))
        split = ClientSplit(list(train), list(test))
    else:
        shares = shares if shares is not None else shares_from_parts(labels, parts, num_classes)
        split = ClientSplit(parts, [t + n_train for t in split_by_shares(test_labels, shares, rng)])
    empty = [i for i, t in enumerate(split.train) if len(t) == 0]
    if empty:
        raise ValueError(f"clients {empty} received no training samples ({scheme} partition of {len(labels)} "
                         f"samples over {num_clients} clients); use fewer clients or more data")
    return split
