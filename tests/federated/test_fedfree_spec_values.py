"""The FedFree spec's numbers in the code and the configs: the defaults of every algorithm and of the federation
(Table A2 / Sec. 4.1 and the "baseline extras"), each config's ``# paper:`` line against Table 1, the configs' paper
hyperparameters, and the two accuracy conventions (FedFree's final-round
unweighted client mean, HtFLlib's best-over-rounds sample-weighted mean with the std over clients)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from lightning_methods.datamodules import FederatedDataModule
from lightning_methods.federated import FedFree, FedGH, FedKD, FedProto, FedProx, FedTGP, PerFedAvg, PFedLA
from lightning_methods.federated.config import FederationConfig
from lightning_methods.federated.partition import PartitionSettings
from lightning_methods.federated.results import round_metrics, summarize
from lightning_methods.models.fed_clients import HTFE_IMG8
from lightning_methods.results.aggregate import paper_numbers

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "federated"

#: FedFree Table 1 (final-round mean client accuracy, %, non-IID1), as the spec gives it: (setting, method, data
#: set, clients) -> number.
TABLE_1 = {
    ("htfe8", "fedfree", "cifar10", 10): 95.81, ("htfe8", "fedfree", "cifar100", 10): 76.83,
    ("htfe8", "fedfree", "cifar10", 20): 95.35, ("htfe8", "fedfree", "cifar100", 20): 70.08,
    ("htfe8", "fedfree", "cifar10", 100): 87.03, ("htfe8", "fedfree", "cifar100", 100): 49.20,
    ("hmfl_cnn", "fedfree", "cifar10", 20): 90.85, ("hmfl_cnn", "fedfree", "cifar100", 20): 52.91,
    ("hmfl_cnn", "fedavg", "cifar100", 20): 23.93, ("hmfl_cnn", "fedprox", "cifar100", 20): 40.68,
    ("hmfl_cnn", "perfedavg", "cifar100", 20): 32.95, ("hmfl_cnn", "pfedla", "cifar100", 20): 33.34,
    ("htfe8", "fedproto", "cifar100", 20): 22.90, ("htfe8", "fedkd", "cifar100", 20): 39.16,
    ("htfe8", "fedgh", "cifar100", 20): 63.60, ("htfe8", "fedtgp", "cifar100", 20): 34.99,
}


def _table_key(name: str) -> tuple[str, str, str, int] | None:
    """``cifar100_htfe8_20clients_fedgh.yaml`` -> ``("htfe8", "fedgh", "cifar100", 20)``; None for the configs
    Table 1 has no number for (other partitions, HtFLlib's protocol, Local-only, the digits demo)."""
    stem = name.removesuffix(".yaml")
    dataset, _, rest = stem.partition("_")
    setting = "hmfl_cnn" if rest.startswith("hmfl_cnn_") else "htfe8" if rest.startswith("htfe8_") else None
    if dataset not in ("cifar10", "cifar100") or setting is None:
        return None
    clients, _, method = rest.removeprefix(f"{setting}_").partition("clients")
    method = method.removeprefix("_") or "fedfree"
    key = (setting, method, dataset, int(clients))
    return key if key in TABLE_1 else None


CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_every_table_1_cell_has_its_config():
    assert {_table_key(n) for n in CONFIGS} - {None} == set(TABLE_1)


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_lines_are_table_1(name):
    key = _table_key(name)
    expected = {} if key is None else {"final_mean": TABLE_1[key]}
    assert paper_numbers(CONFIG_DIR / name) == pytest.approx(expected, abs=0)


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("cifar")])
def test_cifar_configs_use_the_paper_hyperparameters(name):
    """Table A2 / Sec. 4.1: SGD lr 0.01, batch 10, E = 5 (the package default of the 5-vs-30 conflict), T = 200, full
    participation; FedFree: k = 2, server lr 0.01, 256 bins; the spec's defaults for the points the paper leaves
    open; the baselines' extras."""
    raw = yaml.safe_load((CONFIG_DIR / name).read_text())
    fed, data, algo = raw["federation"], raw["data"], raw["algorithm"]
    assert (fed["lr"], fed["rounds"], fed["local_epochs"], data["batch_size"]) == (0.01, 200, 5, 10)
    assert fed["momentum"] == 0.0 and fed["weight_decay"] == 0.0
    assert data["partition"]["classes_per_client"] == (1 if name.startswith("cifar10_") else 10)
    args = algo.get("init_args") or {}
    expected = {
        "FedFree": {"k": 2, "server_lr": 0.01, "server_steps": 5, "pseudo_batch_size": 64, "pseudo_spatial": None,
                    "bins": 256, "projection_fill": "keep", "delta_normalization": "none", "global_family": "fed_cnn"},
        "FedProx": {"mu": 0.01}, "PerFedAvg": {"beta": 0.01}, "PFedLA": {"hn_lr": 0.005}, "FedProto": {"lamda": 10.0},
        "FedKD": {"t_start": 0.95, "t_end": 0.98}, "FedGH": {"server_lr": 0.01},
        "FedTGP": {"lamda": 10.0, "margin_threshold": 100.0}, "LocalOnly": {}, "FedAvg": {},
    }[algo["class_path"].rsplit(".", 1)[-1]]
    assert {k: args.get(k) for k in expected} == expected
    if "htfe8" in name:
        assert fed["families"] == list(HTFE_IMG8)
    else:
        assert fed["families"] == ["fed_cnn"]


def test_defaults_are_the_spec_values():
    fedfree = FedFree()
    assert (fedfree.k, fedfree.server_lr, fedfree.server_steps, fedfree.pseudo_batch_size, fedfree.pseudo_spatial,
            fedfree.bins, fedfree.projection_fill, fedfree.delta_normalization, fedfree.global_family) == (
        2, 0.01, 5, 64, None, 256, "keep", "none", "fed_cnn")
    fed = FederationConfig()
    assert (fed.rounds, fed.local_epochs, fed.lr, fed.families, fed.keep_optimizer_state) == (
        200, 5, 0.01, list(HTFE_IMG8), False)
    assert FederatedDataModule("digits", partition=PartitionSettings(num_clients=2)).batch_size == 10
    part = PartitionSettings()
    assert (part.scheme, part.alpha, part.train_fraction) == ("pathological", 0.1, 0.75)
    assert FedProx().mu == 0.01 and PerFedAvg().beta is None  # None: the clients' lr, 0.01
    assert PFedLA().hn_lr == 0.005 and FedProto().lamda == 10.0
    kd, gh, tgp = FedKD(), FedGH(), FedTGP()
    assert (kd.t_start, kd.t_end, gh.server_lr, gh.server_epochs) == (0.95, 0.98, 0.01, 1)
    assert (tgp.lamda, tgp.server_lr, tgp.server_epochs, tgp.margin_threshold) == (10.0, 0.01, 100, 100.0)


def test_round_metrics_unweighted_mean_and_sample_weighted_mean():
    """Three clients, 9/10, 1/10 and 30/40 correct: FedFree's mean is over clients (0.9 + 0.1 + 0.75) / 3, HtFLlib's
    is over samples 40 / 60; the std is the population std over clients (HtFLlib's np.std)."""
    m = round_metrics([9, 1, 30], [10, 10, 40])
    accs = [0.9, 0.1, 0.75]
    mean = sum(accs) / 3
    assert m["acc/mean"] == pytest.approx(mean, rel=1e-15)
    assert m["acc/weighted"] == pytest.approx(40 / 60, rel=1e-15)
    assert m["acc/std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 3), rel=1e-14)
    assert (m["acc/min"], m["acc/max"]) == (0.1, 0.9)


def test_summary_final_round_and_best_over_rounds():
    """FedFree's number is the last evaluated round's unweighted mean; HtFLlib's the best sample-weighted mean over
    rounds, with the std over clients of that round. A round without evaluation does not count."""
    history = [{"round": 1, "acc/mean": 0.55, "acc/std": 0.1, "acc/weighted": 0.5},
               {"round": 2, "acc/mean": 0.65, "acc/std": 0.2, "acc/weighted": 0.7},
               {"round": 3, "acc/mean": 0.62, "acc/std": 0.3, "acc/weighted": 0.6},
               {"round": 4}]  # not evaluated (eval_every)
    s = summarize(history)
    assert (s["rounds"], s["final_mean"], s["final_std"], s["final_weighted"]) == (4, 0.62, 0.3, 0.6)
    assert (s["best_weighted"], s["best_std"], s["best_round"], s["best_mean"]) == (0.7, 0.2, 2, 0.65)
