"""Seeded label-noise generators (pure functions on numpy arrays).

They follow the generator of the official Early Cutting code (``noise_build.py`` of tmllab/2025_NeurIPS_MEE, used by
Yuan et al., "Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy Examples", arXiv 2502.08227),
consuming the random stream in the same order, so the same seed gives the same labels as that code:

- transition-matrix noise (symmetric, pairflip, asymmetric): one ``RandomState(seed).multinomial`` draw per sample;
- instance-dependent noise (PTD, Xia et al., "Part-dependent Label Noise", NeurIPS 2020): a truncated-normal flip rate
  per sample and a random linear projection of the raw pixels that picks the wrong class;
- real human noise: labels read from a CIFAR-N release file (Wei et al., ICLR 2022, ``CIFAR-10_human.pt`` /
  ``CIFAR-100_human.pt``) that the user supplies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

NoiseType = Literal["none", "sym", "pairflip", "asym", "instance", "cifarn"]
#: Standard CIFAR-10 asymmetric flips (truck->automobile, bird->airplane, cat<->dog, deer->horse).
CIFAR10_ASYM_MAP = {9: 1, 2: 0, 3: 5, 5: 3, 4: 7}


def symmetric_transition(num_classes: int, rate: float) -> np.ndarray:
    """Rows: true class; diagonal ``1 - rate``, off-diagonal ``rate / (C - 1)`` (a flip never keeps the label)."""
    _check_rate(rate)
    P = np.full((num_classes, num_classes), rate / (num_classes - 1))
    np.fill_diagonal(P, 1.0 - rate)
    return P


def pairflip_transition(num_classes: int, rate: float) -> np.ndarray:
    """Pairflip: class ``i`` becomes ``(i + 1) mod C`` with probability ``rate``."""
    return group_cyclic_transition(num_classes, rate, [list(range(num_classes))])


def group_cyclic_transition(num_classes: int, rate: float, groups: list[list[int]]) -> np.ndarray:
    """Asymmetric noise inside groups: the ``j``-th class of a group flips to the ``(j + 1)``-th (cyclically).

    Classes in no group keep their label. ``groups=[[0..C-1]]`` is pairflip; groups of 5 consecutive indices are the
    common CIFAR-100 "asym" convention; CIFAR-100 superclasses give the semantic variant.
    """
    _check_rate(rate)
    P = np.eye(num_classes)
    seen: set[int] = set()
    for group in groups:
        if seen.intersection(group):
            raise ValueError(f"asymmetric noise groups overlap: {groups}")
        seen.update(group)
        if len(group) < 2:
            continue
        for j, c in enumerate(group):
            P[c, c] = 1.0 - rate
            P[c, group[(j + 1) % len(group)]] = rate
    return P


def class_map_transition(num_classes: int, rate: float, mapping: dict[int, int]) -> np.ndarray:
    """Class ``i`` in ``mapping`` flips to ``mapping[i]`` with probability ``rate`` (CIFAR-10 asymmetric noise)."""
    _check_rate(rate)
    P = np.eye(num_classes)
    for src, dst in mapping.items():
        P[src, src], P[src, dst] = 1.0 - rate, rate
    return P


def cifar100_groups(grouping: Literal["consecutive5", "superclass"], coarse_labels: np.ndarray | None = None,
                    fine_labels: np.ndarray | None = None) -> list[list[int]]:
    """Groups of the CIFAR-100 asymmetric noise.

    ``"consecutive5"``: classes {0..4}, {5..9}, ... (the common ELR-style convention; NOT the real superclasses).
    ``"superclass"``: the 20 real superclasses, read from the per-sample ``coarse_labels`` of the release (each group
    sorted by fine class index).
    """
    if grouping == "consecutive5":
        return [list(range(s, s + 5)) for s in range(0, 100, 5)]
    if grouping != "superclass":
        raise ValueError(f"CIFAR-100 asym grouping must be 'consecutive5' or 'superclass', got {grouping!r}")
    if coarse_labels is None or fine_labels is None:
        raise ValueError("superclass grouping needs the coarse_labels of the CIFAR-100 release")
    groups: dict[int, set[int]] = {}
    for fine, coarse in zip(np.asarray(fine_labels).tolist(), np.asarray(coarse_labels).tolist()):
        groups.setdefault(int(coarse), set()).add(int(fine))
    owners = [c for g in groups.values() for c in g]
    if len(owners) != len(set(owners)):
        raise ValueError("coarse_labels do not define a partition of the fine classes")
    return [sorted(groups[k]) for k in sorted(groups)]


def noisify_with_transition(labels: np.ndarray, P: np.ndarray, seed: int) -> np.ndarray:
    """Draw every noisy label from row ``P[y]`` with ``RandomState(seed).multinomial`` (one draw per sample, in
    order)."""
    labels = np.asarray(labels, dtype=np.int64)
    if not np.allclose(P.sum(1), 1.0) or (P < 0).any():
        raise ValueError("the transition matrix must be row-stochastic")
    rng = np.random.RandomState(seed)
    out = np.empty_like(labels)
    for i, y in enumerate(labels.tolist()):
        out[i] = int(np.argmax(rng.multinomial(1, P[y], 1)[0]))
    return out


def instance_noise(images: np.ndarray, labels: np.ndarray, rate: float, num_classes: int, seed: int,
                   std: float = 0.1, max_rate: float = 0.6) -> np.ndarray:
    """Instance-dependent (PTD) noise as generated by the official code.

    ``q_i ~ TruncNormal(rate, std, [0, max_rate])``; ``W ~ N(0, 1)`` of shape ``C x D x C``; for the raw (unnormalized)
    flattened pixels ``x_i``: ``A = x_i @ W[y_i]``, ``A[y_i] = -inf``, label distribution ``q_i * softmax(A)`` off the
    true class and ``1 - q_i`` on it. The random stream is consumed as in the official code (rates, then ``W`` class
    by class, then one uniform per sample), so the same seed gives the same labels.

    Args:
        images: uint8 images, HWC order per sample (the official code flattens N x 32 x 32 x 3 arrays).
        labels: clean labels.
        rate: mean flip rate ``r``.
        num_classes: ``C``.
        seed: seed of the ``RandomState``.
        std: standard deviation of the flip-rate distribution.
        max_rate: upper truncation of the flip rate.
    """
    from scipy import stats

    _check_rate(rate)
    labels = np.asarray(labels, dtype=np.int64)
    x = np.asarray(images).reshape(len(labels), -1).astype(np.float32)
    rng = np.random.RandomState(int(seed))
    q = stats.truncnorm((0 - rate) / std, (max_rate - rate) / std, loc=rate, scale=std).rvs(len(labels),
                                                                                          random_state=rng)
    probs = np.empty((len(labels), num_classes), dtype=np.float32)
    for c in range(num_classes):  # W[c] is drawn in stream order even when no sample has class c
        w = rng.randn(x.shape[1], num_classes).astype(np.float32)
        pos = np.flatnonzero(labels == c)
        if len(pos) == 0:
            continue
        a = x[pos] @ w
        a[:, c] = -np.inf
        a = np.exp(a - a.max(1, keepdims=True))
        p = q[pos, None] * (a / a.sum(1, keepdims=True))
        p[:, c] += 1.0 - q[pos]
        probs[pos] = p
    # np.random.choice(C, p=P[i]) per sample == inverse-CDF sampling with one random_sample() per sample
    u = rng.random_sample(len(labels))
    cdf = probs.astype(np.float64).cumsum(1)
    cdf /= cdf[:, -1:]
    return np.minimum((cdf <= u[:, None]).sum(1), num_classes - 1).astype(np.int64)


def _trusted_numpy_pickle(path: Path) -> bool:
    from torch.serialization import get_unsafe_globals_in_checkpoint

    allowed = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
               "numpy.dtype", "numpy.dtypes.")
    return all(g.startswith(allowed) for g in get_unsafe_globals_in_checkpoint(str(path)))


def read_cifarn_labels(path: str | Path, key: str, clean_labels: np.ndarray | None = None) -> np.ndarray:
    """Read one label set of a CIFAR-N release file (``CIFAR-100_human.pt``: ``noisy_label``; ``CIFAR-10_human.pt``:
    ``worse_label``, ``aggre_label``, ``random_label1..3``), in the order of the official training set.

    If the file holds ``clean_label`` and ``clean_labels`` is given, they must agree (same dataset, same order).
    """
    from lightning_methods.utils.io import safe_torch_load

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-N label file {path} not found. Download CIFAR-10_human.pt / CIFAR-100_human.pt from "
            "https://github.com/UCSC-REAL/cifar-10-100n (data/) and set data.init_args.cifarn_file to its path."
        )
    if not _trusted_numpy_pickle(path):
        raise ValueError(f"{path} references Python objects other than numpy arrays; not a CIFAR-N label file")
    data = safe_torch_load(path, what="CIFAR-N label file", allow_numpy=True)  # numpy arrays only, never code
    if not isinstance(data, dict) or key not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise KeyError(f"{path} has no label set {key!r}; it holds {keys}. Set data.init_args.cifarn_key.")
    noisy = np.asarray(data[key], dtype=np.int64).reshape(-1)
    if clean_labels is not None:
        if len(noisy) != len(clean_labels):
            raise ValueError(f"{path}: {len(noisy)} labels for a training set of {len(clean_labels)} samples")
        if "clean_label" in data and not np.array_equal(np.asarray(data["clean_label"]).reshape(-1), clean_labels):
            raise ValueError(f"{path}: clean_label differs from the dataset's labels (wrong dataset or order)")
    return noisy


def make_noisy_labels(
    labels: np.ndarray,
    noise_type: NoiseType,
    rate: float,
    num_classes: int,
    seed: int,
    images: np.ndarray | None = None,
    asym_groups: list[list[int]] | None = None,
    asym_map: dict[int, int] | None = None,
    include_noise: bool = False,
    cifarn_file: str | Path | None = None,
    cifarn_key: str | None = None,
) -> np.ndarray:
    """Noisy labels for ``labels`` (dispatch on ``noise_type``; see the module docstring).

    ``include_noise`` (symmetric noise only) rescales ``rate`` by ``1 - 1/C`` (the official option: the rate then
    counts flips to any class including the true one). ``asym`` uses ``asym_map`` if given, else ``asym_groups``,
    else the cyclic ``i -> i + 1`` flip (what the official script actually runs).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if noise_type == "none" or (rate == 0 and noise_type in ("sym", "pairflip", "asym", "instance")):
        return labels.copy()
    if noise_type == "sym":
        r = rate * (1 - 1 / num_classes) if include_noise else rate
        return noisify_with_transition(labels, symmetric_transition(num_classes, r), seed)
    if noise_type == "pairflip":
        return noisify_with_transition(labels, pairflip_transition(num_classes, rate), seed)
    if noise_type == "asym":
        if asym_map is not None:
            P = class_map_transition(num_classes, rate, asym_map)
        else:
            P = group_cyclic_transition(num_classes, rate, asym_groups or [list(range(num_classes))])
        return noisify_with_transition(labels, P, seed)
    if noise_type == "instance":
        if images is None:
            raise ValueError("instance-dependent noise needs the training images")
        return instance_noise(images, labels, rate, num_classes, seed)
    if noise_type == "cifarn":
        if cifarn_file is None or cifarn_key is None:
            raise ValueError("noise_type='cifarn' needs cifarn_file (a CIFAR-N *_human.pt file) and cifarn_key")
        return read_cifarn_labels(cifarn_file, cifarn_key, labels)
    raise ValueError(f"unknown noise_type {noise_type!r}; use one of none, sym, pairflip, asym, instance, cifarn")


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
