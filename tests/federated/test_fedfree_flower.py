"""The Flower runtime (``ServerApp`` strategy + ``ClientApp`` on Flower's Message API) against the in-process one.

One test delivers Flower's own ``Message`` objects to the ``ClientApp`` in this process (tests' ``InProcessGrid``,
fast, exact); the other runs Flower's real Simulation Runtime (Ray, 3 supernodes in their own processes; about 18 s
on a 2-core CPU, most of it Ray starting and its workers importing torch and this package).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional extra [federated]")

from fedfree_testing import InProcessGrid, tiny_config  # noqa: E402

from lightning_methods.federated.cli import main  # noqa: E402
from lightning_methods.federated.flower import (  # noqa: E402
    flatten,
    from_records,
    make_client_app,
    make_server_app,
    to_records,
    unflatten,
)
from lightning_methods.utils import safe_torch_load  # noqa: E402


def test_state_records_round_trip():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    state = {"weights": {"a.weight": torch.randn(2, 3), "a.num": torch.tensor(4)},
             "extra": {"mask": torch.tensor([True, False]), "energy": 0.95, "mentee": None, "names": ["x", 1]},
             "optimizer": opt.state_dict()}
    tensors, skeleton = flatten(state)
    assert json.loads(json.dumps(skeleton)) == skeleton and all(isinstance(t, torch.Tensor) for t in tensors.values())
    back = from_records(*to_records(state))
    assert torch.equal(back["weights"]["a.weight"], state["weights"]["a.weight"])
    assert back["extra"]["mask"].dtype == torch.bool and back["extra"]["energy"] == 0.95
    assert back["extra"]["mentee"] is None
    assert list(back["optimizer"]["state"]) == [0]  # int keys survive (optimizer.load_state_dict needs them)
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"], torch.ones(2))
    assert unflatten({}, flatten(3)[1]) == 3


def _in_process(path, tmp_path):
    main(["--config", str(path), "--run_dir", str(tmp_path / "inproc")])
    ckpt = safe_torch_load(tmp_path / "inproc" / "fedfree" / "checkpoints" / "round0001.pt")
    return ckpt["server"]["global_state"], ckpt["history"][0]


def test_flower_round_equals_the_in_process_round(tmp_path, one_thread):
    from flwr.app import Context, RecordDict

    path = tiny_config(tmp_path)
    args = ("--config", str(path))
    grid = InProcessGrid(make_client_app(args), 3)
    make_server_app(args, tmp_path / "flower")(grid, Context(1, 0, {}, RecordDict(), {}))
    flower_state = safe_torch_load(tmp_path / "flower" / "server_state.pt")["global_state"]
    flower = json.loads((tmp_path / "flower" / "history.json").read_text())[0]

    inproc_state, inproc = _in_process(path, tmp_path)
    assert flower_state.keys() == inproc_state.keys()
    assert all(torch.equal(flower_state[k], inproc_state[k]) for k in flower_state)  # the same server update
    assert flower["aligned"] == {str(k): v for k, v in inproc["aligned"].items()}
    assert flower["client_acc"] == pytest.approx(inproc["client_acc"], abs=0)
    # heterogeneous layers travelled as named arrays + JSON metadata in Flower messages
    evaluates = [m for m in grid.sent if m.metadata.message_type == "evaluate" and m.content["config"]["has_payload"]]
    assert evaluates
    meta = json.loads(str(evaluates[0].content["payload_meta"]["json"]))
    assert "local_name" in json.dumps(meta) and len(evaluates[0].content["payload_arrays"]) >= 1


def test_flower_simulation_runtime_equals_the_in_process_round(tmp_path):
    from flwr.simulation import run_simulation

    path = tiny_config(tmp_path)
    args = ("--config", str(path))
    run_simulation(make_server_app(args, tmp_path / "flower"), make_client_app(args), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    flower_state = safe_torch_load(tmp_path / "flower" / "server_state.pt")["global_state"]
    inproc_state, _ = _in_process(path, tmp_path)
    for k in flower_state:  # other processes may use other BLAS threading: equal up to float rounding
        torch.testing.assert_close(flower_state[k], inproc_state[k], rtol=1e-5, atol=1e-6)


def _documented_pyproject() -> str:
    """The ``pyproject.toml`` of a Flower app as docs/methods/federated.md gives it (the block naming the apps)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "methods" / "federated.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", doc, flags=re.S) if "[tool.flwr.app.components]" in b]
    assert len(blocks) == 1, "docs/methods/federated.md should hold one Flower app pyproject.toml block"
    return blocks[0]


def test_documented_flwr_run_route_with_flowers_loader(tmp_path, one_thread):
    """``flwr run .`` validates the app's pyproject.toml (each component must be an attribute assigned in the module's
    source), loads ``server_app`` / ``client_app`` with Flower's ``load_app``, and fuses the run config with the
    ``--run-config`` overrides; the loaded apps then run a round equal to the in-process round."""
    from flwr.app import Context, RecordDict
    from flwr.cli.config_utils import load_and_validate
    from flwr.clientapp import ClientApp
    from flwr.common.config import get_fused_config_from_dir
    from flwr.serverapp import ServerApp
    from flwr.supercore.object_ref import load_app

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(_documented_pyproject())
    config, _ = load_and_validate(app_dir / "pyproject.toml", check_module=True)  # raises on an unknown attribute
    components = config["tool"]["flwr"]["app"]["components"]
    server_app = load_app(components["serverapp"], ValueError, app_dir)
    client_app = load_app(components["clientapp"], ValueError, app_dir)
    assert isinstance(server_app, ServerApp) and isinstance(client_app, ClientApp)

    path = tiny_config(tmp_path)
    run_config = get_fused_config_from_dir(app_dir, {"config": str(path), "overrides": "--progress false",
                                                     "num-server-rounds": 1})
    grid = InProcessGrid(client_app, 3, run_config)
    server_app(grid, Context(1, 0, {}, RecordDict(), run_config))
    flower_dir = tmp_path / "run" / "flower"  # run_dir of the tiny config
    flower_state = safe_torch_load(flower_dir / "server_state.pt")["global_state"]
    history = json.loads((flower_dir / "history.json").read_text())
    inproc_state, inproc = _in_process(path, tmp_path)
    assert len(history) == 1 and history[0]["client_acc"] == pytest.approx(inproc["client_acc"], abs=0)
    assert all(torch.equal(flower_state[k], inproc_state[k]) for k in inproc_state)


@pytest.mark.parametrize("algorithm, families", [
    ({"class_path": "lightning_methods.federated.FedTGP", "init_args": {"server_epochs": 2}}, None),
    ({"class_path": "lightning_methods.federated.PerFedAvg"}, ["fedavg_cnn"]),  # evaluation adapts on a batch
    ({"class_path": "lightning_methods.federated.PFedLA", "init_args": {"k": 1}}, ["fedavg_cnn"]),
])
def test_flower_round_of_the_later_baselines_equals_the_in_process_round(tmp_path, one_thread, algorithm, families):
    from fedfree_testing import assert_same_state
    from flwr.app import Context, RecordDict

    name = algorithm["class_path"].rpartition(".")[2].lower()
    overrides = {"federation__families": families} if families else {}
    path = tiny_config(tmp_path, algorithm, **overrides)
    args = ("--config", str(path))
    make_server_app(args, tmp_path / "flower")(InProcessGrid(make_client_app(args), 3), Context(1, 0, {}, RecordDict(),
                                                                                                 {}))
    main(["--config", str(path), "--run_dir", str(tmp_path / "inproc")])
    inproc = safe_torch_load(tmp_path / "inproc" / name / "checkpoints" / "round0001.pt")
    assert_same_state(safe_torch_load(tmp_path / "flower" / "server_state.pt"), inproc["server"])
    flower = json.loads((tmp_path / "flower" / "history.json").read_text())[0]
    assert flower["client_acc"] == inproc["history"][0]["client_acc"]
