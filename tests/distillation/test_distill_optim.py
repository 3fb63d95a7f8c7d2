"""DeepKD three-momentum optimizer (Huang et al., arXiv 2505.15133): equivalence with SGD for equal momenta, closed
forms per buffer, the official-code quirk, weight-decay placement, state round trip, argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_methods.optim import DeepKD


def _problem(seed: int = 0) -> tuple[nn.Module, list]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(3)]
    return model, batches


def _three_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    z = model(x)
    ce = nn.functional.cross_entropy(z, y)
    return ce, 0.3 * (z**2).mean(), 0.7 * torch.logsumexp(z, 1).mean()  # three different gradient streams


def _grads(model: nn.Module, losses: tuple[torch.Tensor, ...]) -> tuple:
    params = list(model.parameters())
    return tuple(torch.autograd.grad(l, params, retain_graph=True) for l in losses)


@pytest.mark.parametrize("quirk", [False, True])
@pytest.mark.parametrize("wd_stream", ["tog", "tcg", "ncg"])
def test_equal_momenta_equals_sgd_on_the_summed_loss(quirk, wd_stream):
    model, batches = _problem()
    ref = copy.deepcopy(model)
    opt = DeepKD(model.parameters(), lr=0.1, momentum=0.8, delta_tog=0.0, delta_tcg=0.0, delta_ncg=0.0,
                 weight_decay=0.01, weight_decay_stream=wd_stream, replicate_official_momentum_quirk=quirk)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.8, weight_decay=0.01)
    for x, y in batches:
        opt.step(grads=_grads(model, _three_losses(model, x, y)))
        sgd.zero_grad()
        sum(_three_losses(ref, x, y)).backward()
        sgd.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_closed_form_under_constant_gradients():
    p = nn.Parameter(torch.zeros(3))
    m = {"tog": 0.975, "tcg": 0.825, "ncg": 0.95}
    g = {"tog": torch.tensor([1.0, 0.0, 0.0]), "tcg": torch.tensor([0.0, 2.0, 0.0]),
         "ncg": torch.tensor([0.0, 0.0, -3.0])}
    opt = DeepKD([p], lr=0.01, momentum=0.9, delta_tog=0.075, delta_tcg=-0.075, delta_ncg=0.05, weight_decay=0.0)
    expected_theta = torch.zeros(3)
    for n in range(1, 8):
        opt.step(grads=([g["tog"]], [g["tcg"]], [g["ncg"]]))
        state = opt.state[p]
        for stream, key in (("tog", "momentum_buffer"), ("tcg", "momentum_tcg_buffer"), ("ncg", "momentum_ncg_buffer")):
            v_n = g[stream] * (1 - m[stream] ** n) / (1 - m[stream])
            torch.testing.assert_close(state[key], v_n)
            expected_theta -= 0.01 * v_n
        torch.testing.assert_close(p.detach(), expected_theta)


def test_official_quirk_decays_tog_with_the_tcg_momentum():
    p = nn.Parameter(torch.zeros(1))
    g = torch.ones(1)
    opt = DeepKD([p], lr=0.0, momentum=0.9, weight_decay=0.0, replicate_official_momentum_quirk=True)
    for _ in range(5):
        opt.step(grads=([g], [g], [g]))
    m_tcg, m_ncg = 0.825, 0.975
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], g * (1 - m_tcg**5) / (1 - m_tcg))
    torch.testing.assert_close(opt.state[p]["momentum_ncg_buffer"], g * (1 - m_ncg**5) / (1 - m_ncg))
    # official fall-backs: without a TCG gradient the NCG momentum, without either the mean of the three
    for tcg, ncg, m in ((None, g, 0.95), (None, None, (0.975 + 0.825 + 0.95) / 3)):
        q = nn.Parameter(torch.zeros(1))
        opt = DeepKD([q], lr=0.0, delta_ncg=0.05, replicate_official_momentum_quirk=True, weight_decay=0.0)
        for _ in range(5):
            opt.step(grads=([g], [tcg], [ncg]))
        torch.testing.assert_close(opt.state[q]["momentum_buffer"], g * (1 - m**5) / (1 - m))
        assert "momentum_tcg_buffer" not in opt.state[q]
    # the paper rule: the TOG buffer keeps its own momentum whatever the other streams do
    q = nn.Parameter(torch.zeros(1))
    opt = DeepKD([q], lr=0.0, weight_decay=0.0)
    for _ in range(5):
        opt.step(grads=([g], [g], [g]))
    torch.testing.assert_close(opt.state[q]["momentum_buffer"], g * (1 - 0.975**5) / (1 - 0.975))


@pytest.mark.parametrize("stream,key", [("tog", "momentum_buffer"), ("tcg", "momentum_tcg_buffer"),
                                        ("ncg", "momentum_ncg_buffer")])
def test_weight_decay_goes_once_into_the_chosen_stream(stream, key):
    p = nn.Parameter(torch.tensor([2.0, -4.0]))
    zero = torch.zeros(2)
    opt = DeepKD([p], lr=0.1, weight_decay=0.5, weight_decay_stream=stream)
    opt.step(grads=([zero], [zero], [zero]))
    for k in ("momentum_buffer", "momentum_tcg_buffer", "momentum_ncg_buffer"):
        expected = torch.tensor([1.0, -2.0]) if k == key else zero
        torch.testing.assert_close(opt.state[p][k], expected)
    torch.testing.assert_close(p.detach(), torch.tensor([1.9, -3.8]))


def test_state_dict_round_trip_gives_the_same_next_step():
    model, batches = _problem(1)
    opt = DeepKD(model.parameters(), lr=0.05, delta_ncg=0.05)
    for x, y in batches[:2]:
        opt.step(grads=_grads(model, _three_losses(model, x, y)))
    state = copy.deepcopy(opt.state_dict())
    keys = set(state["state"][0])
    assert keys == {"momentum_buffer", "momentum_tcg_buffer", "momentum_ncg_buffer"}
    clone = copy.deepcopy(model)
    opt2 = DeepKD(clone.parameters(), lr=0.05, delta_ncg=0.05)
    opt2.load_state_dict(state)
    x, y = batches[2]
    opt.step(grads=_grads(model, _three_losses(model, x, y)))
    opt2.step(grads=_grads(clone, _three_losses(clone, x, y)))
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), clone.parameters()):
        for k in keys:
            assert torch.equal(opt.state[p][k], opt2.state[q][k])


def test_groups_are_aligned_with_the_gradient_lists():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    opt = DeepKD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}], weight_decay=0.0)
    assert opt.ordered_params() == [a, b]
    ones = [torch.ones(2), torch.ones(1)]
    opt.step(grads=(ones, ones, ones))
    torch.testing.assert_close(a.detach(), torch.full((2,), -3.0))
    torch.testing.assert_close(b.detach(), torch.full((1,), -0.3))


def test_closure_is_evaluated_and_returned():
    p = nn.Parameter(torch.zeros(1))
    opt = DeepKD([p])
    g = [torch.ones(1)]
    assert opt.step(closure=lambda: 7.0, grads=(g, g, g)) == 7.0


def test_bad_arguments():
    p = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="delta_tog"):
        DeepKD([p], momentum=0.95, delta_tog=0.075)
    with pytest.raises(ValueError, match="weight_decay_stream"):
        DeepKD([p], weight_decay_stream="task")
    opt = DeepKD([p])
    with pytest.raises(TypeError, match="grads"):
        opt.step()
    with pytest.raises(ValueError, match="entries"):
        opt.step(grads=([], [], []))
    assert DeepKD.supports_grad_scaler is False


def test_defaults_are_the_spec_values():
    """Spec (distillation.md, DeepKD optimizer): mu = 0.9 with Delta_TOG = +0.075, Delta_TCG = -0.075,
    Delta_NCG = +0.075 (momenta 0.975 / 0.825 / 0.975), weight decay 5e-4 on the TCG gradient only, and the paper's
    momentum rule (official quirk off) by default; lr 0.05 (the CIFAR-100 recipe)."""
    p = nn.Parameter(torch.tensor([2.0]))
    opt = DeepKD([p])
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["momentum"] == 0.9
    assert (group["delta_tog"], group["delta_tcg"], group["delta_ncg"]) == (0.075, -0.075, 0.075)
    assert group["weight_decay"] == 5e-4 and group["weight_decay_stream"] == "tcg"
    assert group["replicate_official_momentum_quirk"] is False
    # behaviour of the defaults: theta = 2 and zero gradients -> only the TCG buffer holds 5e-4 * 2 = 1e-3
    zero = [torch.zeros(1)]
    opt.step(grads=(zero, zero, zero))
    state = opt.state[p]
    assert state["momentum_buffer"].item() == 0.0 and state["momentum_ncg_buffer"].item() == 0.0
    torch.testing.assert_close(state["momentum_tcg_buffer"], torch.tensor([1e-3]), rtol=1e-6, atol=0)
