"""Every configs/federated/*.yaml parses (all classes instantiate) and its first round runs on fake data.

The first-round run keeps each config's algorithm, partition scheme and settings and shrinks the federation to two
clients with small families (``fedavg_cnn``, ``fed_resnet8``; FedKD's mentee ``fed_resnet8``; the heterogeneous
HtFE-img-8 families themselves are checked by the parse test and tests/federated/test_fedfree_models.py), one local
epoch of one batch, no W&B."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from lightning_methods.federated import FedAlgorithm
from lightning_methods.federated.cli import build_parser, main, run
from lightning_methods.federated.config import FederationConfig
from lightning_methods.models.fed_clients import HTFE_IMG8

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "federated"
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_there_is_a_config_per_setting():
    for dataset in ("cifar10", "cifar100"):
        for clients in (10, 20, 100):
            assert f"{dataset}_htfe8_{clients}clients.yaml" in CONFIGS
    for name in ("local", "fedproto", "fedgh", "fedkd", "fedtgp", "dirichlet", "iid"):
        assert f"cifar100_htfe8_20clients_{name}.yaml" in CONFIGS
    for name in ("fedavg", "fedprox", "perfedavg", "pfedla"):
        assert f"cifar100_hmfl_cnn_20clients_{name}.yaml" in CONFIGS
    assert "digits_demo.yaml" in CONFIGS and "cifar100_hmfl_cnn_20clients.yaml" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses(name):
    path = CONFIG_DIR / name
    assert "OpenReview G10Y4vrhGF" in path.read_text() and path.read_text().startswith("#")
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(path)])
    init = parser.instantiate_classes(cfg)
    assert isinstance(init.algorithm, FedAlgorithm) and isinstance(init.federation, FederationConfig)
    raw = yaml.safe_load(path.read_text())
    if "htfe8" in name:
        assert init.federation.families == list(HTFE_IMG8) and init.federation.rounds == 200
        assert cfg.data.partition.classes_per_client == (1 if name.startswith("cifar10_") else 10)
        assert raw["logger"]["class_path"].endswith("WandbLogger")
    if "hmfl" in name:
        assert init.federation.families == ["fed_cnn"]


@pytest.mark.filterwarnings("ignore:.*cover only")  # two clients cannot cover every class of the fake data
@pytest.mark.parametrize("name", CONFIGS)
def test_config_first_round_on_fake_data(name, fake_cifar_root, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    path = CONFIG_DIR / name
    raw = yaml.safe_load(path.read_text())
    args = ["--config", str(path), "--run_dir", str(tmp_path / "run"), "--progress", "false", "--logger", "null",
            "--data.data_dir", str(fake_cifar_root[0]), "--data.download", "false", "--data.partition.num_clients", "2",
            "--federation.rounds", "1", "--federation.local_epochs", "1",
            "--trainer", json.dumps({"accelerator": "cpu", "devices": 1, "precision": "32-true",
                                     "limit_train_batches": 1})]
    if len(raw["federation"]["families"]) > 1:
        args += ["--federation.families", "[fedavg_cnn, fed_resnet8]"]
    if "mentee_family" in (raw["algorithm"].get("init_args") or {}):
        args += ["--algorithm.init_args.mentee_family", "fed_resnet8"]  # a small shared mentee (SVD of small tensors)
    summaries = run(args)
    assert len(summaries) == 1 + len(raw.get("compare_with") or [])
    assert all(s["rounds"] == 1 and 0 <= s["final_mean"] <= 1 for s in summaries)
    assert (tmp_path / "run" / "comparison.md").is_file()
    table = run(["table", str(tmp_path / "run")])
    assert all(f"| {s['algorithm']} | 1 | {100 * s['final_mean']:.2f} +- " in table for s in summaries)
    assert main(["table", str(tmp_path / "run")]) is None  # a console entry returns nothing (it would be the exit code)


def test_help_and_table_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "lightning-methods-fed table" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no results.json"):
        main(["table", str(tmp_path)])


def test_help_names_every_algorithm_in_a_fresh_interpreter():
    """`--help` lists every algorithm of the package as a subclass and `--algorithm.help NAME` shows its options, also
    in a fresh process that has imported none of them yet (the package exports them lazily)."""
    import subprocess
    import sys

    code = ("from lightning_methods.federated.cli import main\n"
            "for args in (['--help'], ['--algorithm.help', 'FedTGP']):\n"
            "    try:\n        main(args)\n    except SystemExit as exit:\n        assert not exit.code, exit.code\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import lightning_methods.federated as federated

    algorithms = [n for n in federated.__all__ if isinstance(getattr(federated, n), type)
                  and issubclass(getattr(federated, n), FedAlgorithm)]
    assert len(algorithms) >= 10
    assert all(f"lightning_methods.federated.{n}" in out.stdout.replace("\n", "").replace(" ", "") for n in algorithms)
    assert "--algorithm.margin_threshold" in out.stdout  # FedTGP's own option


@pytest.mark.filterwarnings("ignore:.*cover only")
def test_grid_over_seeds_and_table_of_a_fed_config(tmp_path, monkeypatch, one_thread):
    """``lightning-methods grid --command fed`` runs a fed config over seeds (each seed in its own run directory, both
    seed keys set) and ``lightning-methods table`` gives one row per algorithm with the mean over the seeds, as
    scripts/demos/run_demos.sh does for the digits demo."""
    from fedfree_testing import tiny_config

    from lightning_methods.results import grid, table

    monkeypatch.chdir(tmp_path)
    path = tiny_config(tmp_path, compare_with=[{"class_path": "lightning_methods.federated.LocalOnly"}])
    grid.main(["--command", "fed", "--config", str(path), "--seeds", "0", "1", "--grid_dir", str(tmp_path / "g")])
    finals = {}
    for seed in (0, 1):
        fed_dir = tmp_path / "g" / "fed" / f"seed{seed}" / "fed"
        for algorithm in ("fedfree", "local"):
            record = json.loads((fed_dir / algorithm / "results.json").read_text())
            assert record["source"]["seed"] == seed and record["environment"]["threads"] == 1
            finals.setdefault(algorithm, []).append(record["summary"]["final_mean"])
        resolved = yaml.safe_load((fed_dir / "fedfree" / "config.yaml").read_text())
        assert resolved["data"]["seed"] == resolved["federation"]["seed"] == seed
    result = table.main([str(tmp_path / "g"), "--metrics", "final_mean", "--no_plot", "--baseline", "fed:local"])
    rows = {r.label.rsplit(":", 1)[-1]: r for r in result.rows}
    assert {r.label for r in result.rows} == {"fed:fedfree", "fed:local"}  # the grid's config name, not its run.yaml
    assert set(rows) == {"fedfree", "local"} and all(r.n == 2 for r in rows.values())
    (versus,) = result.comparisons  # FedFree against Local-only over the two seeds
    assert versus.row == "fed:fedfree" and versus.diff == pytest.approx(
        rows["fedfree"].stats["final_mean"][0] - rows["local"].stats["final_mean"][0], rel=1e-9, abs=1e-9)
    for algorithm, values in finals.items():  # the table's mean is the mean of the two seeds' final-round accuracy
        assert rows[algorithm].stats["final_mean"][0] == pytest.approx(100 * sum(values) / 2)
