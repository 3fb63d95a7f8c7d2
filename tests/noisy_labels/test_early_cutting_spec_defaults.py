"""The Early Cutting spec's defaults (shared/specs/early_cutting.md, "Hyperparameters") and the paper numbers and
official settings of the shipped configs, read from the code's signatures and the YAML files (no training)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from lightning_methods import CoTrainingClassifier
from lightning_methods.callbacks import PredictionHistoryCallback
from lightning_methods.datamodules import NoisyCIFAR100DataModule
from lightning_methods.datamodules.label_noise import make_noisy_labels
from lightning_methods.noisy_labels import mutual_kd_loss
from lightning_methods.noisy_labels.config import SelectionConfig
from lightning_methods.noisy_labels.selection import early_cut
from lightning_methods.results.aggregate import paper_numbers

from helpers import signature_defaults

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "noisy_labels"



def test_code_defaults_are_the_spec_table():
    sel = {f.name: f.default for f in fields(SelectionConfig)}
    assert {k: sel[k] for k in ("rounds", "keep_rate", "k", "warm_up_epochs", "lag", "history_transform",
                                "early_cutting", "cutting_rate", "loss_select", "num_candidates", "loss_quantile",
                                "conf_quantile", "grad_quantile")} == {
        "rounds": 3, "keep_rate": 0.84, "k": 3, "warm_up_epochs": 6, "lag": 1, "history_transform": "train",
        "early_cutting": True, "cutting_rate": 1.5, "loss_select": "count", "num_candidates": 3000,
        "loss_quantile": 0.1, "conf_quantile": 0.2, "grad_quantile": 0.2}
    cut = signature_defaults(early_cut)
    assert (cut["cutting_rate"], cut["loss_select"], cut["num_candidates"], cut["loss_quantile"],
            cut["conf_quantile"], cut["grad_quantile"]) == (1.5, "count", 3000, 0.1, 0.2, 0.2)
    hist = signature_defaults(PredictionHistoryCallback.__init__)
    assert (hist["warm_up_epochs"], hist["k"], hist["lag"], hist["history_transform"]) == (6, 3, 1, "train")
    co = signature_defaults(CoTrainingClassifier.__init__)
    assert (co["backbone"], co["ema_decay"], co["kd_weight"], co["temperature"]) == ("resnet34", 0.999, 0.5, 2.0)
    kd = signature_defaults(mutual_kd_loss)
    assert (kd["temperature"], kd["weight"]) == (2.0, 0.5)
    assert signature_defaults(make_noisy_labels)["include_noise"] is False
    dm = signature_defaults(NoisyCIFAR100DataModule.__init__)
    assert (dm["val_split"], dm["seed"]) == (0.1, 1)  # 10% noisy hold-out, split seed 1
    assert NoisyCIFAR100DataModule.asym_groupings[0] == "consecutive5"  # the first entry is the default
    assert (NoisyCIFAR100DataModule.mean, NoisyCIFAR100DataModule.std) == ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))
    # optimizer=None: SGD lr 0.1, momentum 0.9, weight decay 5e-4 per net
    opt = CoTrainingClassifier(torch.nn.Linear(2, 3), num_classes=3).configure_optimizers()[0][0]
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and (group["lr"], group["momentum"]) == (0.1, 0.9)
    assert max(g["weight_decay"] for g in opt.param_groups) == 5e-4


#: spec "CIFAR-100 setup and reported numbers" (and the CIFAR-10 row): config -> (backbone, noise, rate, keep_rate,
#: paper number of the official max-over-epochs test accuracy)
PAPER = {
    "cifar100_sym20": ("resnet34", "sym", 0.2, 0.925, 76.20),
    "cifar100_sym40": ("resnet34", "sym", 0.4, 0.84, 72.77),
    "cifar100_inst20": ("resnet34", "instance", 0.2, 0.925, 75.03),
    "cifar100_inst40": ("resnet34", "instance", 0.4, 0.84, 69.94),
    "cifar10_sym20": ("resnet18", "sym", 0.2, None, 93.79),
    "cifar10_sym40": ("resnet18", "sym", 0.4, None, 91.80),
    "cifar10_inst20": ("resnet18", "instance", 0.2, None, 93.40),
    "cifar10_inst40": ("resnet18", "instance", 0.4, None, 90.78),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_repro_configs_hold_the_official_settings_and_paper_numbers(name):
    backbone, noise, rate, keep, paper = PAPER[name]
    path = CONFIGS / f"{name}.yaml"
    assert paper_numbers(path) == {"test_acc_max_over_all_epochs_and_rounds": paper}
    cfg = yaml.safe_load(path.read_text())
    model, data, sel = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["selection"]
    assert (model["backbone"], data["noise_type"], data["noise_rate"]) == (backbone, noise, rate)
    if keep is not None:  # the CIFAR-100 README's keep fractions (CIFAR-10 values are not in the spec)
        assert sel["keep_rate"] == keep
    assert (model["ema_decay"], model["kd_weight"], model["temperature"]) == (0.999, 0.5, 2.0)
    assert model["optimizer"]["init_args"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4}
    assert model["lr_scheduler"]["init_args"] == {"T_max": 300, "eta_min": 1.0e-5}
    assert (cfg["trainer"]["max_epochs"], data["batch_size"], data["val_split"], cfg["seed_everything"]) == (
        300, 32, 0.1, 1)
    assert {k: sel[k] for k in ("rounds", "k", "warm_up_epochs", "lag", "history_transform", "cutting_rate",
                                "loss_select", "num_candidates", "conf_quantile", "grad_quantile")} == {
        "rounds": 3, "k": 3, "warm_up_epochs": 6, "lag": 1, "history_transform": "train", "cutting_rate": 1.5,
        "loss_select": "count", "num_candidates": 3000, "conf_quantile": 0.2, "grad_quantile": 0.2}
