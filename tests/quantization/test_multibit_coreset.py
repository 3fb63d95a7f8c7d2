"""Bit-wise coreset functions: scores against autograd, subset size and choice, schedule, per-step batch layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_methods.quantization import (
    bitwise_epoch_order,
    coreset_size,
    el2n_scores,
    grand_last_layer_scores,
    refresh_due,
    select_coreset,
    union_fraction,
)


def test_el2n_is_the_norm_of_the_logit_gradient():
    logits = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    grads = torch.stack([torch.autograd.grad(F.cross_entropy(logits[i : i + 1], y[i : i + 1]), logits)[0][i]
                         for i in range(6)])
    torch.testing.assert_close(el2n_scores(logits.detach(), y), grads.norm(dim=1))


def test_grand_is_the_norm_of_the_classifier_gradient():
    torch.manual_seed(0)
    fc, h, y = torch.nn.Linear(7, 4), torch.randn(5, 7), torch.tensor([0, 1, 2, 3, 1])
    expected = []
    for i in range(5):
        gw, gb = torch.autograd.grad(F.cross_entropy(fc(h[i : i + 1]), y[i : i + 1]), [fc.weight, fc.bias])
        expected.append(torch.cat([gw.flatten(), gb]).norm())
    torch.testing.assert_close(grand_last_layer_scores(fc(h).detach(), y, h), torch.stack(expected))


def test_size_and_bad_prune_rates():
    assert coreset_size(1000, 0.8) == 200 and coreset_size(1000, 0.6) == 400 and coreset_size(1000, 0.0) == 1000
    assert coreset_size(3, 0.99) == 1
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="prune_rate must be in \\[0, 1\\)"):
            coreset_size(100, bad)


def test_top_scores_with_index_tie_break():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.5])
    index = torch.tensor([50, 40, 30, 20, 10, 0])  # dataset indices, not positions
    # 0.9 at positions 1 and 4, then 0.5 by smaller index: position 5 (index 0), position 2 (index 30)
    assert select_coreset(scores, index, 3).tolist() == [1, 4, 5]
    assert select_coreset(scores, index, 4).tolist() == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="coreset size"):
        select_coreset(scores, index, 7)


def test_stratified_and_random_fraction():
    scores = torch.arange(10.0)
    index, targets = torch.arange(10), torch.tensor([0] * 5 + [1] * 5)
    assert select_coreset(scores, index, 4).tolist() == [6, 7, 8, 9]
    assert select_coreset(scores, index, 4, targets, stratified=True).tolist() == [3, 4, 8, 9]
    g = torch.Generator().manual_seed(0)
    mixed = select_coreset(scores, index, 4, random_fraction=0.5, generator=g)
    assert len(mixed) == 4 and {8, 9} <= set(mixed.tolist())
    again = select_coreset(scores, index, 4, random_fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again)  # deterministic under a seed


def test_refresh_schedule():
    due = [e for e in range(25) if refresh_due(e, warmup_full=2, refresh_every=10)]
    assert due == [2, 12, 22]
    assert [e for e in range(4) if refresh_due(e, 0, 1)] == [0, 1, 2, 3]


def test_bitwise_order_visits_each_subset_once_per_epoch():
    n, subsets = 50, [torch.arange(0, 20), torch.arange(10, 30), torch.arange(0, 40, 2)]
    order = bitwise_epoch_order(subsets, n, batch_size=6, seed=0, epoch=3)
    assert order.numel() == 3 * 20
    steps = [order[i : i + 18] for i in range(0, 54, 18)] + [order[54:]]  # 3 full steps of 3 x 6, then 3 x 2
    for step in steps:
        chunks = step.view(3, -1)
        for chunk, subset in zip(chunks, subsets):
            assert torch.isin(chunk, subset).all()
    per_bit = [torch.cat([s.view(3, -1)[b] for s in steps]) for b in range(3)]
    assert all(torch.equal(p.sort().values, s) for p, s in zip(per_bit, subsets))
    same = bitwise_epoch_order([torch.arange(12)] * 2, 12, 4, 0, 0)
    assert torch.equal(same.view(-1, 2, 4)[:, 0], same.view(-1, 2, 4)[:, 1])  # equal subsets -> equal batches
    assert not torch.equal(order, bitwise_epoch_order(subsets, n, 6, 0, 4))  # a new order every epoch
    with pytest.raises(ValueError, match="one size"):
        bitwise_epoch_order([torch.arange(3), torch.arange(4)], 5, 2, 0, 0)


@pytest.mark.parametrize("size", [1, 5, 6, 7, 12, 13, 37])
@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_bitwise_order_reads_every_coreset_sample_once_in_ceil_steps(size, batch_size):
    """ceil(m / B) steps per epoch, every sample of every subset exactly once (no drop_last on coreset epochs)."""
    n = 40
    subsets = [torch.randperm(n, generator=torch.Generator().manual_seed(b))[:size].sort().values for b in range(3)]
    order = bitwise_epoch_order(subsets, n, batch_size=batch_size, seed=2, epoch=1)
    assert order.numel() == 3 * size
    steps, per_bit = -(-size // batch_size), [[] for _ in subsets]
    start = 0
    for t in range(steps):  # the layout the loader reads: 3 x B per step, the last step 3 x (m - (steps - 1) B)
        chunk = min(batch_size, size - t * batch_size)
        for b, part in enumerate(order[start : start + 3 * chunk].view(3, chunk)):
            per_bit[b].append(part)
        start += 3 * chunk
    assert start == order.numel()
    for b, subset in enumerate(subsets):
        assert torch.equal(torch.cat(per_bit[b]).sort().values, subset)  # each index exactly once


@pytest.mark.parametrize("size", [1, 2, 3, 8, 9, 16, 17, 21])
def test_bitwise_order_under_ddp_covers_every_sample_with_equal_step_counts(size):
    """2 ranks, batch 4: both ranks have ceil(m / 8) steps with >= 1 sample per bit; the union is the subset, each
    sample once, except that a last global batch of 1 sample is completed with one repeat."""
    n, batch_size, world = 30, 4, 2
    subsets = [torch.arange(size), torch.arange(n - size, n)]
    ranks = [bitwise_epoch_order(subsets, n, batch_size, seed=3, epoch=0, rank=r, world_size=world)
             for r in range(world)]
    steps = -(-size // (batch_size * world))
    per_rank_bits = []
    for order in ranks:
        per_bit, start = [[], []], 0
        m = order.numel() // 2
        for t in range(steps):
            chunk = min(batch_size, m - t * batch_size)
            assert chunk >= 1  # no empty per-bit batch on any rank, and no extra step
            for b, part in enumerate(order[start : start + 2 * chunk].view(2, chunk)):
                per_bit[b].append(part)
            start += 2 * chunk
        assert start == order.numel()
        per_rank_bits.append([torch.cat(p) for p in per_bit])
    repeats = 1 if size % (batch_size * world) == 1 else 0
    for b, subset in enumerate(subsets):
        both = torch.cat([per_rank_bits[r][b] for r in range(world)])
        assert both.numel() == size + repeats
        assert torch.equal(both.unique(), subset)


def test_bitwise_order_shards_one_global_order_over_ranks():
    subsets = [torch.arange(0, 40), torch.arange(20, 60)]
    single = bitwise_epoch_order(subsets, 64, batch_size=8, seed=1, epoch=0)
    ranks = [bitwise_epoch_order(subsets, 64, batch_size=4, seed=1, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    for b in range(2):
        global_bit = single.view(-1, 2, 8)[:, b].flatten()
        rank_bits = [r.view(-1, 2, 4)[:, b].flatten() for r in ranks]
        assert not set(rank_bits[0].tolist()) & set(rank_bits[1].tolist())  # disjoint shards of one subset
        interleaved = torch.stack(rank_bits, dim=1).flatten()  # rank r takes entries r, r + 2, ... of the global one
        assert torch.equal(interleaved, global_bit)
    assert union_fraction(subsets, 64) == 60 / 64


def test_score_ema_averages_each_childs_scores_across_refreshes():
    """Spec option: an EMA of s_b across refreshes, s = a s_old + (1 - a) s_new; the subsets follow the averaged
    scores. Dyadic scores and a = 0.5 make every value exact."""
    from types import SimpleNamespace

    from lightning_methods.callbacks import BitwiseCoresetCallback

    n, bits = 8, [32, 1]
    index = torch.arange(n)
    rounds = {  # scores per refresh epoch and bit-width
        1: {32: torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1]) / 8, 1: torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8]) / 8},
        3: {32: torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1]), 1: torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])},
    }
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_set=list(range(n))))
    module = SimpleNamespace(train_order=bits)
    results = {}
    for ema in (None, 0.5):
        cb = BitwiseCoresetCallback(prune_rate=0.75, score_ema=ema)  # subsets of round(0.25 * 8) = 2
        for epoch, scores in rounds.items():
            cb._score_pass = lambda t, m, ds, b, s=scores: (index, None, dict(s))
            cb.refresh(trainer, module, epoch)
        results[ema] = cb
    plain, averaged = results[None], results[0.5]
    for b in bits:
        assert torch.equal(plain.scores[b], rounds[3][b])
        assert torch.equal(averaged.scores[b], 0.5 * rounds[1][b] + 0.5 * rounds[3][b])
    # 32 bits: new scores alone tie at positions 4..7 (smaller index first -> 4, 5); averaged 0.5 s_old + 0.5 s_new =
    # [4, 3.5, 3, 2.5, 2, 1.5, 1, 0.5] / 8 + [0, 0, 0, 0, 4, 4, 4, 4] / 8 -> highest at 4 (6 / 8) and 5 (5.5 / 8)
    assert plain.subsets[32].tolist() == [4, 5] and averaged.subsets[32].tolist() == [4, 5]
    # 1 bit: new scores alone keep positions 0, 1; averaged [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4] / 8 + [4, 4, 4, 4, 0, 0,
    # 0, 0] / 8 -> highest at positions 3 (6 / 8) and 2 (5.5 / 8)
    assert plain.subsets[1].tolist() == [0, 1] and averaged.subsets[1].tolist() == [2, 3]
