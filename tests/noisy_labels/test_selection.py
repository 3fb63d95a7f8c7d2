"""Learning-time (FkL) selection and the Early Cutting set arithmetic (lightning_methods/selection.py), checked on
hand-built prediction histories, against a literal re-implementation of the official per-epoch recount, and on a
linear softmax model for the input-gradient norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_methods.callbacks import PredictionHistoryCallback
from lightning_methods.noisy_labels.selection import (
    cut_subset,
    early_cut,
    fkl_order,
    input_gradient_norms,
    learning_epochs,
    loss_candidates,
    mee_from_candidates,
    should_stop,
    simulate_selection_round,
    stop_threshold,
)

T = 7  # every sample's noisy label is class 7 below; other values are other classes


def hand_history() -> tuple[torch.Tensor, torch.Tensor]:
    """8 samples x 12 epochs; warm-up 6 (epochs 0..6 ignored), k = 3."""
    rows = [
        [T] * 12,  # 0: right from epoch 0, but warm-up: learned at 9 (records 7, 8, 9)
        [1] * 8 + [T] * 4,  # 1: right from epoch 8 -> learned at 10
        [T] * 9 + [2] + [T] * 2,  # 2: right at 7, 8, wrong at 9, right at 10, 11 -> not learned
        [3] * 12,  # 3: stable but wrong -> never
        [1] * 9 + [T] * 3,  # 4: right at 9, 10, 11 -> learned at 11
        [T] * 10 + [5] * 2,  # 5: learned at 9, wrong afterwards: stays learned
        [1] * 6 + [4, 4] + [T] * 4,  # 6: wrong at 7, right from 8 on -> learned at 10
        [T, 1] * 6,  # 7: alternating -> never three in a row
    ]
    return torch.tensor(rows), torch.full((8,), T)


def official_recount(preds: np.ndarray, targets: np.ndarray, current_epoch: int, warm_up: int, k: int) -> list[int]:
    """The official ``compute_fkl`` logic (records of epochs < current_epoch), written out literally."""
    n = preds.shape[0]
    counter, prev = [0] * n, [[-1] * n for _ in range(k - 1)]
    selected: list[int] = []
    for pe in range(current_epoch):
        if pe <= warm_up:
            continue
        for t in range(n):
            p = int(preds[t, pe])
            if p == targets[t] and all(p == prev[j][t] for j in range(k - 1)):
                counter[t] += 1
                if counter[t] == 1:
                    selected.append(t)
            for j in range(k - 2, 0, -1):
                prev[j][t] = prev[j - 1][t]
            if k > 1:
                prev[0][t] = p
    return selected


def test_learning_time_on_hand_history():
    preds, targets = hand_history()
    first = learning_epochs(preds, targets, warm_up_epochs=6, k=3)
    assert first.tolist() == [9, 10, -1, -1, 11, 9, 10, -1]
    # without warm-up sample 0 would be learned at epoch 2
    assert learning_epochs(preds, targets, warm_up_epochs=-1, k=3)[0] == 2
    assert learning_epochs(preds, targets, warm_up_epochs=6, k=1).tolist() == [7, 8, 7, -1, 9, 7, 8, 8]
    order = fkl_order(first, torch.arange(100, 108))
    assert order.tolist() == [100, 105, 101, 106, 104]  # by first-learned epoch, ties by base index
    assert fkl_order(first, torch.arange(100, 108), upto_epoch=9).tolist() == [100, 105]


def test_stop_rule_with_one_epoch_lag():
    preds, targets = hand_history()
    idx = torch.arange(8)
    assert stop_threshold(8, 0.3) == 2 and not should_stop(0, 0) and should_stop(3, 2)
    # threshold 2: the records of epochs < 10 hold {0, 5} (learned at 9) -> stop at 10, not 9
    stop, sel = simulate_selection_round(preds, targets, idx, 0.3, 6, 3, lag=1)
    assert stop == 10 and sel.tolist() == [0, 5]
    stop, sel = simulate_selection_round(preds, targets, idx, 0.3, 6, 3, lag=0)
    assert stop == 9 and sel.tolist() == [0, 5]
    # threshold 1 stops at the same epoch and takes ALL learned samples (may exceed the threshold)
    stop, sel = simulate_selection_round(preds, targets, idx, 0.15, 6, 3, lag=1)
    assert stop == 10 and sel.tolist() == [0, 5]
    # threshold 4 (0.5 * 8): records < 11 hold 0, 5, 1, 6 -> stop at 11
    stop, sel = simulate_selection_round(preds, targets, idx, 0.5, 6, 3, lag=1)
    assert stop == 11 and sel.tolist() == [0, 5, 1, 6]
    # never reached: 6 of 8 with only 5 ever learned
    stop, sel = simulate_selection_round(preds, targets, idx, 0.75, 6, 3, lag=1)
    assert stop is None and sel.tolist() == [0, 5, 1, 6]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matches_the_official_recount_on_random_histories(k):
    g = torch.Generator().manual_seed(k)
    n, epochs = 300, 25
    targets = torch.randint(0, 4, (n,), generator=g)
    learned_at = torch.randint(0, epochs, (n,), generator=g)
    noise = torch.randint(0, 4, (n, epochs), generator=g)
    ep = torch.arange(epochs)
    preds = torch.where((ep[None] >= learned_at[:, None]) & (torch.rand(n, epochs, generator=g) < 0.9),
                        targets[:, None], noise)
    first = learning_epochs(preds, targets, warm_up_epochs=4, k=k)
    for e in (8, 15, epochs):
        expected = official_recount(preds.numpy(), targets.numpy(), e, 4, k)
        assert fkl_order(first, torch.arange(n), e - 1).tolist() == expected
    # the callback: epochs fed one by one, rows shuffled each epoch, state saved and restored mid-way
    cb = PredictionHistoryCallback(warm_up_epochs=4, k=k, keep_rate=0.5)
    base = torch.arange(1000, 1000 + n)
    for e in range(5, epochs):
        if e == 12:
            restored = PredictionHistoryCallback(warm_up_epochs=4, k=k, keep_rate=0.5)
            restored.load_state_dict(cb.state_dict())
            cb = restored
        perm = torch.randperm(n, generator=g)
        cb.update(e, base[perm], preds[perm, e], targets[perm], clean_targets=targets[perm])
    stop, sel = simulate_selection_round(preds, targets, base, 0.5, 4, k, lag=1)
    assert cb.stop_epoch == stop and torch.equal(cb.selection, sel)
    assert torch.equal(cb.current_selection(), fkl_order(first, base))


def test_early_cut_equals_the_set_arithmetic():
    rng = np.random.default_rng(0)
    fkl = torch.from_numpy(rng.permutation(5000)[:300])
    loss, conf, grad = (torch.from_numpy(rng.random(300)) for _ in range(3))
    res = early_cut(fkl, loss, conf, grad, cutting_rate=1.5, num_candidates=50)
    subset = fkl[:200].numpy()
    cand_pos = np.argsort(loss[:200].numpy())[-50:]
    cand = subset[cand_pos]
    top_conf = set(cand[np.argsort(-conf[:200].numpy()[cand_pos])[:10]])
    low_grad = set(cand[np.argsort(grad[:200].numpy()[cand_pos])[:10]])
    mee = top_conf & low_grad
    assert set(res.removed.tolist()) == mee and len(mee) > 0
    assert res.selected.tolist() == [i for i in fkl.tolist() if i not in mee]  # FkL order kept
    assert set(res.candidates.tolist()) == set(cand) and torch.equal(res.subset, fkl[:200])
    assert set(res.removed.tolist()) <= set(res.subset.tolist())
    # paper's quantile: 10% of the subset are candidates
    assert len(early_cut(fkl, loss, conf, grad, loss_select="quantile", loss_quantile=0.1).candidates) == 20
    # N = 0: nothing changes; N larger than the subset: the whole subset
    none = early_cut(fkl, loss, conf, grad, num_candidates=0)
    assert torch.equal(none.selected, fkl) and len(none.removed) == 0
    assert len(early_cut(fkl, loss, conf, grad, num_candidates=10_000).candidates) == 200
    # the step functions compose to the same result
    cand2 = loss_candidates(cut_subset(fkl), loss, "count", 50)
    pos = [fkl.tolist().index(i) for i in cand2.tolist()]
    assert set(mee_from_candidates(cand2, conf[pos], grad[pos]).tolist()) == mee
    assert len(cut_subset(fkl[:1], 1.5)) == 1 and len(cut_subset(fkl[:0])) == 0


def test_input_gradient_norm_of_a_linear_softmax_model():
    torch.manual_seed(0)
    W, b = torch.randn(5, 48, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)  # "normalized images"
    y = torch.randint(0, 5, (16,))

    def model(inp: torch.Tensor) -> torch.Tensor:
        return inp.flatten(1) @ W.T + b

    p = F.softmax(model(x), -1)
    analytic = ((p - F.one_hot(y, 5)) @ W).norm(dim=1)  # || W^T (p - onehot(y)) ||
    with torch.no_grad():  # works inside no-grad evaluation code
        norms = input_gradient_norms(model, x, y)
    assert torch.allclose(norms.double(), analytic, rtol=1e-6)
    # per-sample values do not depend on the batch (BatchNorm in eval mode)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(16, 5)).eval()
    xf, single = x.float(), []
    for i in range(4):
        single.append(input_gradient_norms(net, xf[i : i + 1], y[i : i + 1]))
    assert torch.allclose(input_gradient_norms(net, xf[:4], y[:4]), torch.cat(single), rtol=1e-5)
    assert all(p.grad is None for p in net.parameters())


def test_compute_early_cut_scores_with_the_later_model_in_eval_mode_without_augmentation():
    """The cut with a model (noisy_labels/cut.py) equals the set arithmetic of :func:`early_cut` on scores computed
    independently in float64 from the definitions: CE against the noisy label and max softmax probability on the
    normalized, un-augmented images, and ||d CE / d x||_2 per sample (one sample at a time), BatchNorm in eval mode.
    The model is handed over in train mode with non-trivial running statistics and the DataModule augments
    (crop + flip), so batch statistics or augmentation would change every score. Base indices are non-contiguous and
    the FkL order is shuffled, so a misaligned score changes the result."""
    import copy
    from types import SimpleNamespace

    from lightning_methods.datamodules import IndexedTensorDataset
    from lightning_methods.noisy_labels.config import SelectionConfig
    from lightning_methods.noisy_labels.cut import compute_early_cut

    g = torch.Generator().manual_seed(0)
    n, classes = 60, 5
    images = torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, classes, (n,), generator=g)
    base = torch.arange(n) * 3 + 5
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    dm = SimpleNamespace(train_set=IndexedTensorDataset(images, targets, base), mean=mean, std=std, augment="standard")
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(64, classes))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    reference = copy.deepcopy(model).double().eval()
    fkl = base[torch.randperm(n, generator=g)[:45]]  # 45 selected -> the first int(45 / 1.5) = 30 are re-examined
    cfg = SelectionConfig(num_candidates=12, conf_quantile=0.25, grad_quantile=0.5, score_batch_size=7)

    pos = torch.searchsorted(base, fkl)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    x = (images[pos].double() / 255 - m) / s
    y = targets[pos]
    with torch.no_grad():
        logits = reference(x)
    loss = F.cross_entropy(logits, y, reduction="none")
    conf = logits.softmax(-1).max(-1).values
    grad = torch.empty(len(fkl), dtype=torch.float64)
    for i in range(len(fkl)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(F.cross_entropy(reference(xi), y[i : i + 1]), xi)
        grad[i] = gi.norm()
    expected = early_cut(fkl, loss, conf, grad, cutting_rate=1.5, num_candidates=12, conf_quantile=0.25,
                         grad_quantile=0.5)
    # the float32 scores of the module are within ~1e-5 of these; every ranking boundary the cut uses is wider
    def gap(values: torch.Tensor, k: int) -> float:
        v = values.sort(descending=True).values
        return float(v[k - 1] - v[k])

    cand_pos = torch.tensor([fkl.tolist().index(i) for i in expected.candidates.tolist()])
    assert min(gap(loss[:30], 12), gap(conf[cand_pos], 3), gap(-grad[cand_pos], 6)) > 1e-4
    assert 0 < len(expected.removed) < 3  # a non-trivial cut

    result, scores = compute_early_cut(model, dm, fkl, cfg)
    assert torch.equal(result.subset, fkl[:30]) and torch.equal(scores["subset"], fkl[:30])
    assert torch.equal(result.candidates, expected.candidates)
    assert torch.equal(result.removed, expected.removed) and torch.equal(result.selected, expected.selected)
    torch.testing.assert_close(scores["loss"].double(), loss[:30], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores["confidence"].double(), conf[:30], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores["candidate_grad_norm"].double(), grad[cand_pos], rtol=1e-4, atol=1e-6)
