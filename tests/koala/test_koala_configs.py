"""configs/koala/ and the class defaults against shared/specs/koala.md ("Hyperparameters", "CIFAR-100 setup and reported
numbers"): optimizer settings, schedule, batch size, epochs and the `# paper:` numbers of every shipped file."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

from lightning_methods.optim import KOALAM, KOALAV, KOALAPlusPlus
from lightning_methods.optim.koala_base import R_INIT
from lightning_methods.results.aggregate import paper_numbers

DIR = Path(__file__).resolve().parents[2] / "configs" / "koala"
KOALAPP = {"lr": 1.0, "sigma": 0.1, "q": 0.1, "r": None, "alpha_r": 0.9, "weight_decay": 5e-4, "symmetric": True}
KOALAM_OFFICIAL = {"lr": 1.0, "sigma_x": 0.1, "sigma_c": 0.0, "sigma_v": 0.1, "kappa": 0.9, "q_x": 0.01, "q_v": 0.01,
                   "r": None, "alpha_r": 0.9, "weight_decay": 5e-4}
STEP_100 = ("torch.optim.lr_scheduler.MultiStepLR", {"milestones": [30, 60, 90], "gamma": 0.2})
COSINE_200 = ("torch.optim.lr_scheduler.CosineAnnealingLR", {"T_max": 200, "eta_min": 1e-4})
# file: (backbone, optimizer class, its init_args (subset), schedule, epochs, paper accuracy = 100 - the paper's error)
FILES = {
    "cifar100_resnet50_koalapp.yaml": ("resnet50", "lightning_methods.optim.KOALAPlusPlus", KOALAPP, STEP_100, 100,
                                       78.0),
    "cifar100_resnet18_koalapp.yaml": ("resnet18", "lightning_methods.optim.KOALAPlusPlus", KOALAPP, STEP_100, 100,
                                       None),
    "cifar100_wrn50_2_koalapp.yaml": ("wrn_50_2", "lightning_methods.optim.KOALAPlusPlus", KOALAPP, STEP_100, 100,
                                      None),
    "cifar100_resnet50_koalapp_cosine200.yaml": ("resnet50", "lightning_methods.optim.KOALAPlusPlus", KOALAPP,
                                                 COSINE_200, 200, None),
    "cifar100_resnet50_koalam.yaml": ("resnet50", "lightning_methods.optim.KOALAM", KOALAM_OFFICIAL, STEP_100, 100,
                                      77.3),
    # baselines of the KOALA++ CNN scripts: SGD lr 0.1, momentum 0.9, wd 5e-4; Adam lr 3e-4, wd 5e-4
    "cifar100_resnet50_sgd.yaml": ("resnet50", "torch.optim.SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
                                   STEP_100, 100, 76.1),
    "cifar100_resnet50_adam.yaml": ("resnet50", "torch.optim.Adam", {"lr": 3e-4, "weight_decay": 5e-4}, STEP_100, 100,
                                    75.4),
}


# the offline digits demo (scripts/demos/run_demos.sh koala): the optimizers of the CIFAR-100 files above, on ResNet-8
DIGITS = {f"digits_{name}.yaml": f"cifar100_resnet50_{name}.yaml" for name in ("sgd", "adam", "koalam", "koalapp")}


def test_every_shipped_file_is_checked():
    assert {p.name for p in DIR.glob("*.yaml")} == set(FILES) | set(DIGITS)


@pytest.mark.parametrize("name", sorted(DIGITS))
def test_digits_demo_uses_the_cifar_optimizers_and_differs_only_in_them(name):
    """Each digits demo file has the optimizer section of its CIFAR-100 file and is digits_sgd.yaml otherwise (the
    KOALA optimizers add KOALAMonitor), with the 100-epoch step schedule scaled to 12 epochs (x0.2 at 4 / 7 / 11)."""
    cfg = yaml.safe_load((DIR / name).read_text())
    ref = yaml.safe_load((DIR / "digits_sgd.yaml").read_text())
    cifar = yaml.safe_load((DIR / DIGITS[name]).read_text())
    opt = cfg["model"]["init_args"].pop("optimizer")
    assert opt == cifar["model"]["init_args"]["optimizer"]
    ref["model"]["init_args"].pop("optimizer")
    koala = "koala" in name
    assert cfg["trainer"].pop("callbacks", None) == (cifar["trainer"]["callbacks"] if koala else None)
    assert cfg["trainer"]["logger"]["init_args"].pop("name") == f"digits-{name[7:-5]}"
    ref["trainer"]["logger"]["init_args"].pop("name")
    assert cfg == ref
    assert ref["trainer"]["max_epochs"] == 12 and ref["model"]["init_args"]["lr_scheduler"]["init_args"] == {
        "milestones": [4, 7, 11], "gamma": 0.2}
    assert ref["data"]["class_path"].endswith("DigitsDataModule")


@pytest.mark.parametrize("name", sorted(FILES))
def test_config_matches_the_spec(name):
    backbone, cls, args, (sched_cls, sched_args), epochs, paper = FILES[name]
    cfg = yaml.safe_load((DIR / name).read_text())
    init = cfg["model"]["init_args"]
    assert init["backbone"] == backbone
    assert cfg["trainer"]["max_epochs"] == epochs and cfg["data"]["init_args"]["batch_size"] == 128
    opt = init["optimizer"]
    assert opt["class_path"] == cls
    assert {k: opt["init_args"].get(k) for k in args} == args
    assert init["lr_scheduler"]["class_path"] == sched_cls and init["lr_scheduler"]["init_args"] == sched_args
    # weight decay is internal to KOALA: nothing else may add or remove it
    assert "no_weight_decay_roles" not in init
    assert paper_numbers(DIR / name) == ({"test/acc": paper} if paper is not None else {})


def test_class_defaults_match_the_spec():
    """KOALAV(lr=1.0, sigma=0.1, q=0.01, r=None, alpha_r=0.9, weight_decay=5e-4); KOALAM with the official code's
    defaults; KOALAPlusPlus(lr=1.0, sigma=0.1, q=0.1, r=None, alpha_r=0.9, weight_decay=5e-4, symmetric=True); every
    class skips tensors with a gradient norm below 1e-9; the adaptive R starts at 1."""
    p = torch.nn.Parameter(torch.zeros(2))
    common = {"r": None, "alpha_r": 0.9, "weight_decay": 5e-4, "grad_eps": 1e-9}
    want = {
        KOALAV: {"lr": 1.0, "sigma": 0.1, "q": 0.01, "direction": "grad", **common},
        KOALAM: {**KOALAM_OFFICIAL, "grad_eps": 1e-9},
        KOALAPlusPlus: {**KOALAPP, "grad_eps": 1e-9},
    }
    for cls, expected in want.items():
        defaults = cls([p]).defaults
        assert {k: defaults[k] for k in expected} == expected, cls.__name__
    assert inspect.signature(KOALAM).parameters["q_x_estimate"].default == "paper"  # docs/methods/koala.md: our choice
    assert R_INIT == 1.0
