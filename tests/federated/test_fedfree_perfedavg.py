"""Per-FedAvg (FO): the local meta-steps and the one-step adaptation against PFLlib's numbers, and a federation that
evaluates the adapted models and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fedfree_testing import assert_same_state, kill_and_resume, make_runner
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_methods.federated import PerFedAvg
from lightning_methods.federated.algorithm import ClientData, ClientInfo
from lightning_methods.federated.client import evaluate_client
from lightning_methods.federated.local import PERSONALIZE_KEY
from lightning_methods.utils import mix_seed

GOLDEN = json.loads((Path(__file__).parent / "golden_perfedavg.json").read_text())
NAMES = {"0.weight": "body.weight", "0.bias": "body.bias", "2.weight": "head.weight", "2.bias": "head.bias"}


class TinyNet(nn.Module):
    """PFLlib's test model ``Sequential(Linear(4, 5), ReLU, Linear(5, 3))`` with the clients' feature + head API."""

    num_features = 5

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def golden_net(state: str) -> TinyNet:
    net = TinyNet().double()
    net.load_state_dict({NAMES[k]: torch.tensor(v, dtype=torch.float64) for k, v in GOLDEN[state].items()})
    return net


def golden_batches(size: int) -> list[dict[str, torch.Tensor]]:
    """The golden data in unshuffled batches of ``size`` (the last incomplete one dropped, as the clients' loader)."""
    x, y = torch.tensor(GOLDEN["X"], dtype=torch.float64), torch.tensor(GOLDEN["Y"])
    return [{"image": x[i : i + size], "target": y[i : i + size]} for i in range(0, len(y) - size + 1, size)]


def assert_state(net: nn.Module, golden: dict, steps: int) -> None:
    # O(1) weights after `steps` SGD updates whose losses are summed in another order: ~10 ulps per step
    for name, value in GOLDEN[golden].items():
        torch.testing.assert_close(net.state_dict()[NAMES[name]], torch.tensor(value, dtype=torch.float64),
                                   rtol=0, atol=10 * steps * torch.finfo(torch.float64).eps)


def test_local_meta_steps_match_pfllib(one_thread):
    net = golden_net("init")
    algo = PerFedAvg(beta=GOLDEN["beta"])
    info = ClientInfo(client_id=0, family="tiny", num_classes=3, num_examples=len(GOLDEN["Y"]), lr=GOLDEN["lr"])
    module = algo.make_module(net, {}, info)
    # the classifier computes its loss in float32 (mixed-precision safe); in float64 here, to compare the steps
    module.per_sample_loss = lambda logits, b: nn.functional.cross_entropy(logits, b["target"], reduction="none")
    trainer = Trainer(accelerator="cpu", max_epochs=GOLDEN["epochs"], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    # B-sample batches in order: pairs (0, 1), (2, 3) are PFLlib's two 2B batches; the unpaired 5th is not used
    batches = golden_batches(GOLDEN["B"])
    assert len(batches) == 4
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2 * 2 * GOLDEN["epochs"]  # two optimizer steps per pair, two pairs per epoch
    assert_state(net, "trained", steps=8)


def test_hessian_free_step_equals_the_paper_update_with_an_explicit_hessian(one_thread):
    # no reference code has Per-FedAvg (HF): w - beta (I - alpha H(w; D'')) grad f(w - alpha grad f(w; D); D'), with
    # the Hessian built as a full matrix (torch.autograd.functional.hessian) instead of the module's double backward
    alpha, beta = 0.3, 0.2
    net = golden_net("init")
    d, d1, d2 = golden_batches(4)[:3]
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    w = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def f(flat, batch):
        params, i = {}, 0
        for n, shape in zip(names, shapes):
            params[n] = flat[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        logits = torch.func.functional_call(net, params, (batch["image"],))
        return nn.functional.cross_entropy(logits, batch["target"])

    grad = lambda flat, batch: torch.autograd.grad(f(flat.requires_grad_(True), batch), flat)[0]  # noqa: E731
    adapted = w - alpha * grad(w.clone(), d)
    g = grad(adapted.clone(), d1)
    hessian = torch.autograd.functional.hessian(lambda flat: f(flat, d2), w.clone())
    expected = w - beta * (g - alpha * hessian @ g)

    module = PerFedAvg(beta=beta, variant="hf").make_module(net, {}, ClientInfo(0, "tiny", 3, 12, lr=alpha))
    module.per_sample_loss = lambda logits, b: nn.functional.cross_entropy(logits, b["target"], reduction="none")
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([d, d1, d2], batch_size=None))
    got = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    # O(1) weights, one step; the Hessian-vector product summed in another order: a few ulps of |H g|
    torch.testing.assert_close(got, expected, rtol=0, atol=64 * torch.finfo(torch.float64).eps)
    assert not torch.allclose(got, w - beta * g, rtol=0, atol=1e-6)  # the Hessian term is there


def test_one_step_adaptation_matches_pfllib():
    net = golden_net("trained")
    batch = golden_batches(GOLDEN["B"])[0]
    info = ClientInfo(client_id=0, family="tiny", num_classes=3, num_examples=14, lr=GOLDEN["lr"])
    PerFedAvg().personalize(net, {}, info, ClientData(lambda: [batch], lambda b: b))
    assert_state(net, "adapted", steps=9)


def test_bad_settings_are_refused_with_their_values():
    with pytest.raises(ValueError, match="beta=0"):
        PerFedAvg(beta=0)
    with pytest.raises(ValueError, match="variant='so'"):
        PerFedAvg(variant="so")
    info = ClientInfo(client_id=0, family="tiny", num_classes=3, num_examples=1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum=0.9"):
        PerFedAvg().validate_client(TinyNet(), info)


def test_federation_evaluates_adapted_models_and_resumes(tmp_path, one_thread, monkeypatch):
    full, resumed, calls = kill_and_resume(tmp_path, PerFedAvg, monkeypatch, rounds=2, kill_round=2,
                                           families=["fedavg_cnn"])
    assert calls == [(2, 0), (2, 1)]
    assert_same_state(full.clients, resumed.clients)
    assert_same_state(full.algorithm.server_state_dict(), resumed.algorithm.server_state_dict())
    assert [h["client_acc"] for h in full.history] == [h["client_acc"] for h in resumed.history]
    # every client holds the global model; its accuracy is that of the global model after one step on a training
    # batch drawn by (seed, round, client): recomputed here outside the runtime
    rt, data, algo = full.runtime, full.data, full.algorithm
    for i, client in enumerate(full.clients):
        assert_same_state(client["weights"], algo.global_state)
        net = rt.net(i, client)
        seed = mix_seed(full.fed.seed, PERSONALIZE_KEY, 2, i)
        batch = data.normalize_batch(next(iter(data.client_loader(i, "train", train=True, seed=seed))))
        loss = nn.functional.cross_entropy(net(batch["image"]), batch["target"])
        grads = torch.autograd.grad(loss, list(net.parameters()))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads):
                p.sub_(full.fed.lr * g)
        net.eval()
        correct, total = evaluate_client(net, data.client_loader(i, "test"), data.normalize_batch)
        assert full.history[-1]["client_acc"][i] == correct / total
    # and the adaptation matters: the global model's own accuracy is another number on some client
    plain = make_runner(tmp_path / "c", PerFedAvg(), rounds=1, num_clients=2, families=["fedavg_cnn"])
    monkeypatch.setattr(PerFedAvg, "personalize", lambda *a: None)
    plain.run()
    assert plain.history[-1]["client_acc"] != full.history[0]["client_acc"]


@pytest.mark.filterwarnings("ignore:.*cover only")
def test_hessian_free_federation_trains(tmp_path, one_thread):
    runner = make_runner(tmp_path, PerFedAvg(variant="hf"), rounds=1, num_clients=2, families=["fedavg_cnn"])
    runner.trainer["limit_train_batches"] = 3  # one HF step (three batches) per client
    runner.run()
    short = make_runner(tmp_path / "short", PerFedAvg(variant="hf"), rounds=1, num_clients=2, families=["fedavg_cnn"])
    with pytest.warns(UserWarning, match="took no step: one step needs 3 batches"):
        short.run()  # two batches per client-round (the tests' trainer): no HF step, said
    initial = PerFedAvg()
    initial.setup_server(runner.federation_info()[1])  # the model every client started from
    assert any(not torch.equal(v, initial.global_state[k]) for k, v in runner.algorithm.global_state.items())
    assert all(0 <= a <= 1 for a in runner.history[0]["client_acc"])
