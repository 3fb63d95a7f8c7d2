"""KD / TCKD / NCKD / DKD losses (Hinton et al. arXiv 1503.02531; DKD arXiv 2203.08679; DeepKD top-k mask,
arXiv 2505.15133): the exact decomposition, reference values, zero loss at equality, the top-k mask, numerics."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_methods.losses import (
    dkd_loss,
    kd_loss,
    nckd_loss,
    standardize_logits,
    tckd_loss,
    teacher_target_prob,
    topk_keep_mask,
)


def _logits(b: int, c: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=torch.float64) * scale,
            torch.randn(b, c, generator=g, dtype=torch.float64) * scale,
            torch.randint(0, c, (b,), generator=g))


@pytest.mark.parametrize("c", [3, 5, 100])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_equals_tckd_plus_weighted_nckd_per_sample(c, t):
    s, te, y = _logits(16, c, seed=c + int(t))
    kd = kd_loss(s, te, t, "none")
    weight = 1 - teacher_target_prob(te, y, t)
    decomposed = tckd_loss(s, te, y, t, "none") + weight * nckd_loss(s, te, y, t, None, "none")
    assert kd.shape == (16,)
    torch.testing.assert_close(kd, decomposed.to(kd.dtype), atol=1e-5, rtol=1e-5)


def test_reference_values():
    s, t, y = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([0])
    assert kd_loss(s, t, 1.0).item() == pytest.approx(1.150421, abs=1e-5)
    assert tckd_loss(s, t, y, 1.0).item() == pytest.approx(0.995723, abs=1e-5)
    assert nckd_loss(s, t, y, 1.0).item() == pytest.approx(0.462117, abs=1e-5)
    assert teacher_target_prob(t, y, 1.0).item() == pytest.approx(0.665241, abs=1e-5)
    # by hand: the temperature enters as z / T with the T^2 factor
    p_t, log_p_s = torch.softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    by_hand = 4 * (p_t * (p_t.log() - log_p_s)).sum()
    assert kd_loss(s, t, 2.0).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_reductions_and_dkd_weights():
    s, t, y = _logits(8, 10, seed=3)
    for fn in (lambda r: kd_loss(s, t, 4.0, r), lambda r: tckd_loss(s, t, y, 4.0, r),
               lambda r: nckd_loss(s, t, y, 4.0, 3, r)):
        torch.testing.assert_close(fn("mean"), fn("none").mean())
    expected = 1.5 * tckd_loss(s, t, y, 4.0, "none") + 6.0 * nckd_loss(s, t, y, 4.0, None, "none")
    torch.testing.assert_close(dkd_loss(s, t, y, 1.5, 6.0, 4.0, reduction="none"), expected)
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(s, t, 4.0, "sum")
    with pytest.raises(ValueError, match="batch, classes"):
        kd_loss(s, t[:, :5])


@pytest.mark.parametrize("fn", ["kd", "tckd", "nckd", "dkd"])
def test_zero_loss_and_zero_gradient_when_student_equals_teacher(fn):
    _, t, y = _logits(6, 7, seed=5)
    s = t.clone().requires_grad_(True)
    loss = {"kd": lambda: kd_loss(s, t), "tckd": lambda: tckd_loss(s, t, y), "nckd": lambda: nckd_loss(s, t, y, topk=3),
            "dkd": lambda: dkd_loss(s, t, y)}[fn]()
    loss.backward()
    assert abs(loss.item()) < 1e-10
    assert s.grad.abs().max().item() < 1e-10


def test_topk_mask_k_at_least_c_is_plain_nckd():
    s, t, y = _logits(8, 10, seed=7)
    plain = nckd_loss(s, t, y, 4.0, None, "none")
    for k in (0, 10, 11, 1000):
        torch.testing.assert_close(nckd_loss(s, t, y, 4.0, k, "none"), plain, rtol=0, atol=0)


def test_topk_mask_content():
    t = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    y = torch.tensor([0, 2])
    keep = topk_keep_mask(t, y, 3)
    # row 0: top-3 = {0, 1, 2}, the target 0 is in it -> only 2 non-target classes survive
    assert keep[0].tolist() == [False, True, True, False, False]
    # row 1: top-3 = {4, 3, 2}, target 2 removed
    assert keep[1].tolist() == [False, False, False, True, True]


def test_topk_nckd_equals_renormalized_kl_over_kept_classes():
    s, t, y = _logits(4, 8, seed=11)
    k, temp = 4, 2.0
    keep = topk_keep_mask(t, y, k)
    expected = []
    for i in range(4):
        idx = keep[i].nonzero().squeeze(1)
        q_t = torch.softmax(t[i, idx] / temp, -1)
        log_q_s = torch.log_softmax(s[i, idx] / temp, -1)
        expected.append(temp**2 * (q_t * (q_t.log() - log_q_s)).sum())
    torch.testing.assert_close(nckd_loss(s, t, y, temp, k, "none"), torch.stack(expected))


def test_topk_gradient_is_exactly_zero_outside_the_teacher_topk():
    s, t, y = _logits(6, 12, seed=13)
    s.requires_grad_(True)
    k = 4
    nckd_loss(s, t, y, 4.0, k).backward()
    keep = topk_keep_mask(t, y, k)
    assert (s.grad[~keep] == 0).all()  # exactly zero, including at the target class
    assert (s.grad[keep] != 0).any()


def test_topk_no_surviving_class_gives_zero_loss_and_finite_gradient():
    # k = 1 and the target is the teacher's top-1: no non-target class survives
    t = torch.tensor([[9.0, 1.0, 0.0]])
    s = torch.tensor([[0.0, 3.0, 1.0]], requires_grad=True)
    loss = nckd_loss(s, t, torch.tensor([0]), 4.0, 1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_numerically_safe_for_confident_logits():
    # float32 softmax rounds p_y to exactly 1 here: log(1 - p_y) would be -inf in the official formulation
    s = torch.tensor([[200.0, 0.0, -50.0], [0.0, 300.0, 10.0]], requires_grad=True)
    t = torch.tensor([[0.0, 250.0, 5.0], [400.0, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    for fn in (lambda: kd_loss(s, t, 1.0), lambda: tckd_loss(s, t, y, 1.0), lambda: nckd_loss(s, t, y, 1.0),
               lambda: dkd_loss(s, t, y, 1.0, 8.0, 1.0, topk=2)):
        s.grad = None
        loss = fn()
        loss.backward()
        assert math.isfinite(loss.item()) and loss.item() > 0
        assert torch.isfinite(s.grad).all()
    # TCKD of sample 0 in closed form: b_s = [1 - eps, eps], b_t = [~e^-250, ~1] -> ~ log(1 / eps_s) ~ 200
    assert tckd_loss(s, t, y, 1.0, "none")[0].item() == pytest.approx(200.0, rel=1e-3)


def test_standardize_logits():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    out = standardize_logits(z)
    assert out.mean().abs().item() < 1e-6
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
