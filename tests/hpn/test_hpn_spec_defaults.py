"""The HPN spec's defaults (shared/specs/hpn.md, "Hyperparameters") and the official settings and paper numbers of
the shipped CIFAR-100 configs, read from the code's signatures and the YAML files (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_methods.hpn import HPNClassifier, HPNMultiTask, HPNRegressor, optimize_prototypes
from lightning_methods.hpn.base import official_sgd
from lightning_methods.hpn.prototypes import build_prototypes, prototype_filename
from lightning_methods.losses.hpn import COSINE_EPS, multitask_loss
from lightning_methods.results.aggregate import paper_numbers

from helpers import signature_defaults

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "hpn"



def test_code_defaults_are_the_spec_table():
    proto = signature_defaults(optimize_prototypes)
    assert {k: proto[k] for k in ("num_classes", "dims", "iterations", "lr", "persistent_momentum", "seed",
                                  "neighbours", "prior_weight")} == {
        "num_classes": 100, "dims": 100, "iterations": 10_000, "lr": 0.1, "persistent_momentum": False, "seed": 300,
        "neighbours": 5, "prior_weight": 1.0}
    build = signature_defaults(build_prototypes)
    assert (build["iterations"], build["seed"], build["persistent_momentum"], build["neighbours"]) == (
        10_000, 300, False, 5)
    cls = signature_defaults(HPNClassifier.__init__)
    assert {k: cls[k] for k in ("prototype_dims", "prototype_seed", "prototype_iterations",
                                "prototype_persistent_momentum", "semantic_neighbours", "reduction", "cosine_eps",
                                "backbone")} == {
        "prototype_dims": 100, "prototype_seed": 300, "prototype_iterations": 10_000,
        "prototype_persistent_momentum": False, "semantic_neighbours": 5, "reduction": "sum", "cosine_eps": 1e-9,
        "backbone": "hpn_resnet32"}
    assert signature_defaults(HPNRegressor.__init__)["reduction"] == "sum" and COSINE_EPS == 1e-9
    mt = signature_defaults(HPNMultiTask.__init__)
    assert (mt["task_weight"], mt["reg_dim"]) == (0.5, 1)  # official code default t (0.25 reported best)
    mtl = signature_defaults(multitask_loss)
    assert (mtl["task_weight"], mtl["reg_dim"], mtl["reduction"]) == (0.5, 1, "sum")
    # optimizer=None: the official SGD lr 0.01, momentum 0.9, weight decay 1e-4
    opt = official_sgd([torch.nn.Parameter(torch.zeros(1))])
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"]) == (0.01, 0.9, 1e-4)
    model = HPNClassifier(backbone=torch.nn.Linear(2, 3), num_classes=4, prototype_dims=3, prototype_iterations=5)
    group = model.configure_optimizers().param_groups[0]
    assert (group["lr"], group["momentum"]) == (0.01, 0.9)
    assert prototype_filename(100, 25) == "prototypes-25d-100c.npy"


#: spec "CIFAR-100 setup and reported numbers": HPN without priors, ResNet-32, top-1 % by output dimension D
PAPER = {10: 51.1, 25: 63.0, 50: 64.7, 100: 65.0}


@pytest.mark.parametrize("dims", sorted(PAPER))
def test_cifar100_configs_hold_the_official_settings_and_paper_numbers(dims):
    path = CONFIGS / f"cifar100_resnet32_d{dims}.yaml"
    assert paper_numbers(path) == {"test/acc": PAPER[dims]}
    cfg = yaml.safe_load(path.read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert (model["backbone"], model["prototype_dims"], model["prototype_seed"], model["prototype_iterations"],
            model["prototype_persistent_momentum"], model["reduction"]) == ("hpn_resnet32", dims, 300, 10_000, False,
                                                                            "sum")
    assert model["optimizer"]["init_args"] == {"lr": 0.01, "momentum": 0.9, "weight_decay": 1.0e-4}
    assert model["lr_scheduler"]["init_args"] == {"milestones": [100, 200], "gamma": 0.1}
    assert (cfg["trainer"]["max_epochs"], data["batch_size"], cfg["seed_everything"]) == (250, 128, 100)


def test_softmax_baseline_config_paper_number():
    assert paper_numbers(CONFIGS / "cifar100_resnet32_softmax.yaml") == {"test/acc": 62.1}
