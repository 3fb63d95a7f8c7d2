"""Hyperspherical prototypes: placement by separation, optional semantic priors, and the ``.npy`` file format.

Mettes, van der Pol, Snoek. *Hyperspherical Prototype Networks*. NeurIPS 2019, arXiv 1901.10514, section 2.1.

``K`` prototypes in ``D`` dimensions are spread over the unit sphere before any network is trained, by minimising the
mean over classes of the largest cosine to another prototype,

    L_HP = (1/K) sum_i max_{j != i} cos(p_i, p_j),

with SGD and a re-normalisation of every row after every step. The arithmetic follows the official ``prototypes.py``
(psmmettes/hpn) so that a run with the same seed gives the same prototypes: Gaussian initialisation from
``torch.manual_seed(seed)``, rows normalised, loss computed on ``P P^T + 1`` with the diagonal pushed to ``-2``
(constants that change neither the arg-max nor the gradient), SGD with lr 0.1. The official script builds a fresh
``SGD(momentum=0.9)`` after every step, so its momentum buffer never survives a step: the update is plain gradient
descent (``persistent_momentum=False``, the default). ``persistent_momentum=True`` keeps one momentum buffer for the
whole run (our option; it is what "momentum 0.9" would mean in a single optimiser).

Semantic priors (paper section 2.3; exact form our choice because the official code path does not run): with
normalised class embeddings ``E`` (e.g. word2vec, class order = dataset order), ``N(i)`` are the ``neighbours``
classes closest to ``i`` in embedding cosine (``i`` itself excluded) and ``O(i)`` all other classes. The ranking term
``-mean_{i, j in N(i)} cos(p_i, p_j) + mean_{i, k in O(i)} cos(p_i, p_k)`` (equal to the mean over all triplets
``(i, j, k)``, as every class has the same number of triplets) is added to ``L_HP`` with weight ``prior_weight``.
The official code instead indexes neighbours by their rank position, counts ``i`` as its own first neighbour and
drops the least similar class from ``O(i)``; those are bugs and are not reproduced.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightning_methods.utils.io import atomic_save_numpy, safe_torch_load


def _check_shape(num_classes: int, dims: int) -> None:
    if num_classes < 2:
        raise ValueError(f"prototypes need at least 2 classes, got num_classes={num_classes}")
    if dims < 2:
        raise ValueError(f"prototype dims must be >= 2 (a cosine on a 1-d sphere is only +-1), got dims={dims}")


def _official_product(prototypes: torch.Tensor) -> torch.Tensor:
    product = prototypes @ prototypes.t() + 1  # official arithmetic: +1, diagonal -> -2 (never the row maximum)
    return product - 2.0 * torch.diag(torch.diag(product))


def separation_loss(prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_HP`` of unit-norm prototypes and their largest pairwise cosine.

    Args:
        prototypes: (K, D) rows of unit norm (the optimiser keeps them so; the value is a dot product).

    Returns:
        ``(loss, max_cos)``: the mean over rows of the largest off-diagonal cosine (differentiable) and the largest
        off-diagonal cosine overall (detached).
    """
    product = _official_product(prototypes)
    return product.max(dim=1)[0].mean() - 1, product.max().detach() - 1


def semantic_neighbour_masks(embeddings: torch.Tensor, neighbours: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (K, K) masks ``N`` (the ``neighbours`` nearest classes in embedding cosine, self excluded, ties by
    index) and ``O`` (every other class but self)."""
    k = embeddings.shape[0]
    if not 1 <= neighbours <= k - 2:
        raise ValueError(f"neighbours must be in [1, num_classes - 2] = [1, {k - 2}] so that every class has "
                         f"neighbours and others, got {neighbours}")
    e = F.normalize(embeddings.double(), dim=1)
    sim = e @ e.t()
    sim.fill_diagonal_(float("-inf"))
    order = torch.argsort(-sim, dim=1, stable=True)
    near = torch.zeros(k, k, dtype=torch.bool).scatter_(1, order[:, :neighbours], True)
    others = ~near
    others.fill_diagonal_(False)
    return near, others


def semantic_ranking_loss(prototypes: torch.Tensor, near: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """``-mean cos(p_i, p_j) over (i, j in N(i)) + mean cos(p_i, p_k) over (i, k in O(i))`` (see module docstring).

    Args:
        prototypes: (K, D) unit-norm rows.
        near: (K, K) boolean mask of the semantic neighbours (:func:`semantic_neighbour_masks`).
        others: (K, K) boolean mask of the other classes.
    """
    cos = prototypes @ prototypes.t()
    near, others = near.to(cos.device), others.to(cos.device)
    return -(cos * near).sum() / near.sum() + (cos * others).sum() / others.sum()


def load_class_embeddings(path: str | Path, num_classes: int) -> torch.Tensor:
    """A (K, E) class-embedding matrix from ``.npy`` / ``.pt`` / text (one class per row), class order = dataset.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a 2-d array with ``num_classes`` rows, or a row that is zero or not finite.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class-embedding file {path} does not exist (a K x E array, one row per class in "
                                "dataset order, e.g. word2vec vectors of the class names; nothing is downloaded)")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif path.suffix in (".pt", ".pth"):
        array = np.asarray(safe_torch_load(path, what="class-embedding file"))
    else:
        array = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
    emb = torch.as_tensor(np.asarray(array, dtype=np.float64))
    if emb.ndim != 2 or emb.shape[0] != num_classes:
        raise ValueError(f"class-embedding file {path} holds shape {tuple(emb.shape)}; expected ({num_classes}, E): "
                         "one row per class, in the dataset's class order")
    if not torch.isfinite(emb).all() or (emb.norm(dim=1) == 0).any():
        raise ValueError(f"class-embedding file {path} has a zero or non-finite row; every class needs an embedding")
    return emb


def optimize_prototypes(
    num_classes: int = 100,
    dims: int = 100,
    iterations: int = 10_000,
    lr: float = 0.1,
    momentum: float = 0.9,
    persistent_momentum: bool = False,
    seed: int = 300,
    embeddings: torch.Tensor | None = None,
    neighbours: int = 5,
    prior_weight: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Hyperspherical prototypes by SGD on :func:`separation_loss` (see the module docstring).

    Args:
        num_classes: number of prototypes K.
        dims: dimension D of the output space (>= 2; D may be smaller than K).
        iterations: SGD steps (official: 10,000).
        lr: step size (official: 0.1).
        momentum: momentum of the persistent variant; ignored by the default official update.
        persistent_momentum: ``False`` replicates the official update (a fresh optimiser every step, i.e. plain
            gradient descent); ``True`` keeps one SGD momentum buffer for the whole run.
        seed: seed of the Gaussian initialisation (official: 300), drawn as ``torch.manual_seed(seed); randn(K, D)``.
        embeddings: optional (K, E) class embeddings for the semantic-prior ranking term.
        neighbours: semantic neighbours per class (only with ``embeddings``).
        prior_weight: weight of the ranking term (official: 1).
        dtype: float32 (official) or float64.

    Returns:
        (K, D) CPU tensor with unit-norm rows.

    Raises:
        ValueError: ``dims < 2``, ``num_classes < 2``, non-positive ``iterations``/``lr``, or embeddings whose row
            count is not ``num_classes``.
    """
    _check_shape(num_classes, dims)
    if iterations < 0 or lr <= 0:
        raise ValueError(f"need iterations >= 0 and lr > 0, got iterations={iterations}, lr={lr}")
    masks = None
    if embeddings is not None:
        if embeddings.ndim != 2 or embeddings.shape[0] != num_classes:
            raise ValueError(f"embeddings must be ({num_classes}, E), got {tuple(embeddings.shape)}")
        masks = semantic_neighbour_masks(embeddings, neighbours)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # K x D matmuls: threads only add synchronisation (30x slower on a busy machine)
    try:
        init = torch.randn(num_classes, dims, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        protos = F.normalize(init, p=2, dim=1).requires_grad_(True)
        opt = torch.optim.SGD([protos], lr=lr, momentum=momentum) if persistent_momentum else None
        for _ in range(iterations):
            loss = _official_product(protos).max(dim=1)[0].mean()
            if masks is not None:
                loss = loss + prior_weight * semantic_ranking_loss(protos, *masks)
            (grad,) = torch.autograd.grad(loss, [protos])
            with torch.no_grad():
                if opt is None:  # official: a fresh SGD each step, whose first step is p - lr * grad
                    protos = F.normalize(protos.add(grad, alpha=-lr), p=2, dim=1).requires_grad_(True)
                else:
                    protos.grad = grad
                    opt.step()
                    protos.copy_(F.normalize(protos, p=2, dim=1))
    finally:
        torch.set_num_threads(threads)
    return protos.detach()


@functools.lru_cache(maxsize=8)
def _cached(num_classes: int, dims: int, iterations: int, seed: int, persistent_momentum: bool,
            embeddings_file: str | None, neighbours: int) -> torch.Tensor:
    emb = load_class_embeddings(embeddings_file, num_classes) if embeddings_file else None
    return optimize_prototypes(num_classes, dims, iterations, persistent_momentum=persistent_momentum, seed=seed,
                               embeddings=emb, neighbours=neighbours)


def build_prototypes(num_classes: int, dims: int, iterations: int = 10_000, seed: int = 300,
                     persistent_momentum: bool = False, embeddings_file: str | None = None,
                     neighbours: int = 5) -> torch.Tensor:
    """:func:`optimize_prototypes` with the official lr, memoised per process (modules rebuilt with the same
    settings, e.g. in ``load_from_checkpoint`` or a sweep, do not optimise again). Returns a fresh copy."""
    file = str(Path(embeddings_file).expanduser().resolve()) if embeddings_file else None
    return _cached(num_classes, dims, iterations, seed=seed, persistent_momentum=persistent_momentum,
                   embeddings_file=file, neighbours=neighbours).clone()


def prototype_filename(num_classes: int, dims: int) -> str:
    """The official file name ``prototypes-{D}d-{K}c.npy``."""
    return f"prototypes-{dims}d-{num_classes}c.npy"


def save_prototypes(path: str | Path, prototypes: torch.Tensor) -> Path:
    """Write (K, D) prototypes as a ``.npy`` file (float32 unless given float64), atomically."""
    array = prototypes.detach().cpu().numpy()
    array = array if array.dtype == np.float64 else array.astype(np.float32)
    return atomic_save_numpy(array, Path(path).expanduser())


def load_prototypes(path: str | Path, num_classes: int, dims: int) -> torch.Tensor:
    """Read a (K, D) ``.npy`` prototype file, check its shape, and return float32 unit-norm rows.

    Rows that are not unit norm (to 1e-4) are normalised with a warning: predictions compare cosines to every
    prototype, which is only fair when all have the same norm.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the array is not (num_classes, dims), or has a zero / non-finite row.
    """
    _check_shape(num_classes, dims)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prototype file {path} does not exist; make it with `lightning-methods prototypes "
                                f"--classes {num_classes} --dims {dims} --out {prototype_filename(num_classes, dims)}` "
                                "or leave prototype_file empty to build the prototypes on the fly")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"prototype file {path} is not a plain .npy array ({err})") from err
    if array.ndim != 2 or array.shape != (num_classes, dims):
        raise ValueError(f"prototype file {path} holds shape {array.shape}, but the model needs (classes, dims) = "
                         f"({num_classes}, {dims}); use a file made for {num_classes} classes in {dims} dimensions "
                         f"({prototype_filename(num_classes, dims)}) or set prototype_dims to {array.shape[-1]}")
    protos = torch.from_numpy(np.ascontiguousarray(array)).float()
    norms = protos.norm(dim=1)
    if not torch.isfinite(protos).all() or (norms == 0).any():
        raise ValueError(f"prototype file {path} has a zero or non-finite row")
    if (norms - 1).abs().max() > 1e-4:
        warnings.warn(f"prototype file {path}: rows are not unit norm (norms {norms.min():.4g}..{norms.max():.4g}); "
                      "normalising them", stacklevel=2)
        protos = F.normalize(protos, dim=1)
    return protos
