"""Bit-wise coreset sampling of EMQ as pure functions: importance scores, subset choice, schedule, batch layout.

Kim, An, Jeon, Ko. *Efficient Multi-bit Quantization Network Training via Weight Bias Correction and Bit-wise Coreset
Sampling*. NeurIPS 2025, arXiv 2510.20673. The paper fixes the concept (each child model, i.e. each bit-width, scores
the data with a gradient-based importance score and trains on its own subset, re-sampled during training); the exact
recipe here is our choice (spec ``multibit_quant.md``):

- score of sample i for child b: EL2N ``||softmax(f_b(x_i)) - onehot(y_i)||_2`` (the norm of dCE/dlogits; Paul et
  al., arXiv 2107.07075), or GraNd restricted to the last layer (the norm of the classifier's per-sample gradient,
  ``EL2N * sqrt(||h_i||^2 + 1)`` for a classifier with bias and input features h_i), or random;
- subset: the ``round((1 - p) N)`` highest scores, ties broken by the smaller ``index``; options: per-class quotas
  (stratified), a fraction drawn at random from the rest;
- schedule: full data for ``warmup_full`` epochs, then a refresh every ``refresh_every`` epochs;
- batch layout: one step holds one batch per bit-width (each child visits its subset once per epoch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_methods.utils import mix_seed


def coreset_size(n: int, prune_rate: float) -> int:
    """``round((1 - prune_rate) n)``, at least 1.

    Raises:
        ValueError: if ``prune_rate`` is outside [0, 1) or ``n < 1``.
    """
    check_prune_rate(prune_rate)
    if n < 1:
        raise ValueError(f"the training set is empty (n = {n})")
    return max(1, int(round((1.0 - prune_rate) * n)))


def check_prune_rate(prune_rate: float) -> None:
    if not 0.0 <= prune_rate < 1.0:
        raise ValueError(f"prune_rate must be in [0, 1) (the fraction of the data each bit-width skips), got "
                         f"{prune_rate}")


def refresh_due(epoch: int, warmup_full: int, refresh_every: int) -> bool:
    """Whether the subsets are (re)computed at the start of ``epoch`` (0-indexed)."""
    return epoch >= warmup_full and (epoch - warmup_full) % refresh_every == 0


def el2n_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """EL2N: ``||softmax(logits) - onehot(targets)||_2`` per sample (fp32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return (probs - F.one_hot(targets, probs.shape[-1]).float()).norm(dim=-1)


def grand_last_layer_scores(logits: torch.Tensor, targets: torch.Tensor, features: torch.Tensor,
                            bias: bool = True) -> torch.Tensor:
    """Norm of the per-sample CE gradient w.r.t. the classifier's weight (and bias): the outer product
    ``(p - y) h^T`` has norm ``||p - y|| ||h||``, the bias gradient ``p - y``."""
    sq = features.float().flatten(1).pow(2).sum(-1) + (1.0 if bias else 0.0)
    return el2n_scores(logits, targets) * sq.sqrt()


def _top(scores: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k highest scores; equal scores ordered by the smaller ``index``."""
    by_index = torch.argsort(index, stable=True)
    order = by_index[torch.argsort(-scores[by_index], stable=True)]
    return order[:k]


def _class_quotas(targets: torch.Tensor, size: int) -> dict[int, int]:
    """Per-class shares of ``size`` proportional to the class counts (largest remainder, ties to the lower class)."""
    classes, counts = torch.unique(targets, return_counts=True)
    exact = counts.double() * size / counts.sum()
    quotas = exact.floor().long()
    rest = size - int(quotas.sum())
    order = torch.argsort(-(exact - quotas), stable=True)
    quotas[order[:rest]] += 1
    return {int(c): int(q) for c, q in zip(classes, quotas)}


def select_coreset(scores: torch.Tensor, index: torch.Tensor, size: int, targets: torch.Tensor | None = None,
                   stratified: bool = False, random_fraction: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose ``size`` positions (sorted) by score.

    Args:
        scores: importance of every sample (higher = kept first), shape (N,).
        index: the sample's dataset index (tie-break: smaller index first), shape (N,).
        size: subset size.
        targets: labels, needed when ``stratified``.
        stratified: give every class a quota proportional to its size and take the top scores within it.
        random_fraction: fraction of ``size`` drawn uniformly from the samples not chosen by score.
        generator: the draw's generator (needed when ``random_fraction > 0``).

    Raises:
        ValueError: for a size outside 1..N, a fraction outside [0, 1], or missing targets / generator.
    """
    n = scores.shape[0]
    if not 1 <= size <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {size}")
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction}")
    n_random = int(round(random_fraction * size))
    n_top = size - n_random
    if stratified:
        if targets is None:
            raise ValueError("stratified selection needs the targets")
        parts = []
        for c, quota in _class_quotas(targets, n_top).items():
            members = (targets == c).nonzero().flatten()
            parts.append(members[_top(scores[members], index[members], quota)])
        chosen = torch.cat(parts) if parts else scores.new_zeros(0, dtype=torch.long)
    else:
        chosen = _top(scores, index, n_top)
    if n_random:
        if generator is None:
            raise ValueError("random_fraction > 0 needs a generator")
        mask = torch.ones(n, dtype=torch.bool)
        mask[chosen] = False
        rest = mask.nonzero().flatten()
        chosen = torch.cat([chosen, rest[torch.randperm(len(rest), generator=generator)[:n_random]]])
    return chosen.sort().values


def bitwise_epoch_order(subsets: Sequence[torch.Tensor], n: int, batch_size: int, seed: int, epoch: int,
                        rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The positions one rank reads in one epoch, laid out as steps of ``len(subsets)`` consecutive per-bit batches.

    All subsets must have one size ``m``. Every subset is visited in the order of one permutation of ``range(n)``
    drawn from ``(seed, epoch)`` (so equal subsets give equal batches and overlapping subsets keep their relative
    order). The epoch has ``ceil(m / (B W))`` steps: the global batch of one bit-width at step t is entries
    ``t B W ... (t + 1) B W - 1`` of the ordered subset, as in a single-process run with batch ``B W``, and rank
    ``r`` of ``W`` takes its entries ``r, r + W, ...``. Every sample of every subset is read exactly once per epoch
    (the last step is partial, never dropped), with one exception under DDP: a last global batch with fewer than
    ``W`` samples is completed with the first samples of the ordered subset, so that every rank has one (at most
    ``W - 1`` repeats per subset and epoch). Step t of a rank holds ``[batch of subset 0 | batch of subset 1 | ...]``.

    Returns:
        An int64 tensor of positions of length ``len(subsets) * samples_per_bit``.

    Raises:
        ValueError: if the subsets differ in size, ``batch_size < 1``, ``world_size < 1`` or a subset is empty.
    """
    sizes = {int(s.numel()) for s in subsets}
    if len(sizes) != 1:
        raise ValueError(f"every bit-width's subset must have one size for the per-step layout, got {sorted(sizes)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size} is not a valid rank")
    size = sizes.pop()
    if size == 0:
        raise ValueError("the coresets are empty: lower prune_rate")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    rank_of = torch.empty(n, dtype=torch.long)
    rank_of[perm] = torch.arange(n)
    ordered = torch.stack([s[torch.argsort(rank_of[s], stable=True)] for s in subsets])  # (bits, m)
    global_batch = batch_size * world_size
    full, rest = divmod(size, global_batch)
    if 0 < rest < world_size:  # a last global batch too small to give every rank a sample: complete it
        ordered = torch.cat([ordered, ordered[:, : world_size - rest]], dim=1)
        rest = world_size
    chunks = [ordered[:, t * global_batch : (t + 1) * global_batch][:, rank::world_size] for t in range(full)]
    if rest:
        chunks.append(ordered[:, full * global_batch :][:, rank::world_size])
    return torch.cat([c.reshape(-1) for c in chunks])


def union_fraction(subsets: Sequence[torch.Tensor], n: int) -> float:
    """Fraction of the training set in the union of the subsets (the data the shared weights see per epoch)."""
    seen = torch.zeros(n, dtype=torch.bool)
    for s in subsets:
        seen[s] = True
    return float(seen.float().mean())
