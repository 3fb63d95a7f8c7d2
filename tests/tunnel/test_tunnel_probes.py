"""Linear probes: learning on separable data, all probes in one pass == one at a time, and the reimplementation's
training loop (DHLSmith/jons-tunnel-effect LinearProbe: Adam 1e-3, batch 512, 30 epochs) reproduced to float64
round-off from the same initialisation and sample orders (golden values from running its code)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_methods.analysis.linear_probe import epoch_order, probe_accuracy, probe_init, train_linear_probes

F64 = torch.float64

#: outputs of the reimplementation's LinearProbe.train (torch.manual_seed(0), float64) on golden_data()
GOLDEN = {"train_acc": 0.9881818294525146, "test_acc": 0.9900000095367432, "W_sum": 0.43982282034278536,
          "W_abs_sum": 6.168560488683892, "W00": 0.14466852738489747, "W_last": -0.03600704347626003,
          "b": [-0.024743450305692773, -0.17073112895071654, -0.1601339767370961],
          "test_logits_sum": -364.4284269329522}


def golden_data():
    g = torch.Generator().manual_seed(99)
    centers = 1.5 * torch.randn(3, 20, generator=g, dtype=F64)
    ytr = torch.randint(0, 3, (1100,), generator=g)
    yte = torch.randint(0, 3, (300,), generator=g)
    xtr = centers[ytr] + torch.randn(1100, 20, generator=g, dtype=F64)
    xte = centers[yte] + torch.randn(300, 20, generator=g, dtype=F64)
    return xtr, ytr, xte, yte


def reference_draws(d: int, classes: int, n: int, epochs: int = 30):
    """The reimplementation's draws from the global RNG after torch.manual_seed(0): nn.Linear's initialisation,
    then per epoch the DataLoader iterator's base seed and the RandomSampler's seed."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lin = nn.Linear(d, classes, dtype=F64)
        orders = []
        for _ in range(epochs):
            torch.empty((), dtype=torch.int64).random_()
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            orders.append(torch.randperm(n, generator=torch.Generator().manual_seed(seed)))
    return (lin.weight.detach(), lin.bias.detach()), orders


def test_reproduces_the_reimplementation_loop():
    xtr, ytr, xte, yte = golden_data()
    init, orders = reference_draws(20, 3, 1100)
    probe = train_linear_probes({"x": xtr}, ytr, 3, dtype=F64, init={"x": init}, epoch_orders=orders)["x"]
    w, b = probe.weight, probe.bias
    assert w.sum().item() == pytest.approx(GOLDEN["W_sum"], abs=1e-12)
    assert w.abs().sum().item() == pytest.approx(GOLDEN["W_abs_sum"], abs=1e-12)
    assert w[0, 0].item() == pytest.approx(GOLDEN["W00"], abs=1e-14)
    assert w[-1, -1].item() == pytest.approx(GOLDEN["W_last"], abs=1e-14)
    torch.testing.assert_close(b, torch.tensor(GOLDEN["b"], dtype=F64), rtol=0, atol=1e-14)
    assert probe.logits(xte).sum().item() == pytest.approx(GOLDEN["test_logits_sum"], abs=1e-9)
    assert probe.train_acc == pytest.approx(GOLDEN["train_acc"], abs=1e-6)
    assert probe_accuracy({"x": probe}, {"x": xte}, yte)["x"] == pytest.approx(GOLDEN["test_acc"], abs=1e-6)


def separable(n: int, d: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g)
    centers = 4.0 * centers / centers.norm(dim=1, keepdim=True)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + 0.3 * torch.randn(n, d, generator=g), y


def test_separable_gaussians_reach_99_percent_within_30_epochs(one_thread):
    x, y = separable(3000, 32, 5, 0)
    xtr, ytr, xte, yte = x[:2000], y[:2000], x[2000:], y[2000:]
    probes = train_linear_probes({"a": xtr}, ytr, 5, epochs=30)
    assert probe_accuracy(probes, {"a": xte}, yte)["a"] >= 0.99
    assert probes["a"].train_acc >= 0.99


def test_all_probes_in_one_pass_equal_one_at_a_time(one_thread):
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (700,), generator=g)
    feats = {"conv1": torch.randn(700, 48, generator=g) + y[:, None].float(),
             "conv2": torch.randn(700, 16, generator=g).half(),  # fp16 storage
             "fc": torch.randn(700, 4, generator=g) * 3 + torch.nn.functional.one_hot(y, 4)}
    kw = dict(epochs=3, batch_size=128, seed=5)
    together = train_linear_probes(feats, y, 4, **kw)
    acc_together = probe_accuracy(together, feats, y)
    for name, f in feats.items():
        alone = train_linear_probes({name: f}, y, 4, **kw)[name]
        assert torch.equal(alone.weight, together[name].weight), name
        assert torch.equal(alone.bias, together[name].bias), name
        assert alone.train_acc == together[name].train_acc
        assert probe_accuracy({name: alone}, {name: f}, y)[name] == acc_together[name]


def test_seeds_init_and_order():
    w1, b1 = probe_init(10, 3, "layer", seed=0)
    w2, _ = probe_init(10, 3, "layer", seed=0)
    assert torch.equal(w1, w2) and not torch.equal(w1, probe_init(10, 3, "other", seed=0)[0])
    assert w1.abs().max() <= 10 ** -0.5 and b1.abs().max() <= 10 ** -0.5
    assert torch.equal(epoch_order(50, 1, 2), epoch_order(50, 1, 2))
    assert not torch.equal(epoch_order(50, 1, 2), epoch_order(50, 1, 3))


def test_bad_input():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match="one row per target"):
        train_linear_probes({"a": x[:9]}, y, 2)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        train_linear_probes({"a": x}, y + 1, 2)
    with pytest.raises(ValueError, match="at least one"):
        train_linear_probes({}, y, 2)
