"""configs/sam/: the paper's setup and per-variant rho in every file, files consistent across backbones and
augmentations, and every optimizer / callback section buildable (the fast_dev_run fits are in test_configs.py via
tests/overrides_sam.py)."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from overrides_sam import FITTED

from lightning_methods.optim import sam_closure
from lightning_methods.parameters import param_groups_by_role
from lightning_methods.results.aggregate import paper_numbers

from helpers import TinyNet

DIR = Path(__file__).resolve().parents[2] / "configs" / "sam"
MODELS = {"wrn28_10": "wrn_28_10", "resnet56": "resnet56"}
# variant: (optimizer class, perturb, adaptive, p, rho); rho = best value of the SAM-ON teaser figure (WRN-28-10,
# CIFAR-100) or, for no-norm, the rho of the all-parameter run; SSAM: rho of the SSAM README (WRN-28-10, CIFAR-100)
VARIANTS = {
    "sgd": (None, None, None, None, None),
    "sam": ("SAM", "all", None, 2, 0.2),
    "samon": ("SAMON", "only_norm", None, 2, 1.0),
    "sam_nonorm": ("SAM", "no_norm", None, 2, 0.2),
    "asam_elementwise": ("ASAM", "all", "elementwise", 2, 5.0),
    "asamon_elementwise": ("ASAMON", "only_norm", "elementwise", 2, 10.0),
    "asam_elementwise_nonorm": ("ASAM", "no_norm", "elementwise", 2, 5.0),
    "asam_layerwise": ("ASAM", "all", "layerwise", 2, 0.05),
    "asamon_layerwise": ("ASAMON", "only_norm", "layerwise", 2, 0.5),
    "asam_layerwise_nonorm": ("ASAM", "no_norm", "layerwise", 2, 0.05),
    "asam_linf": ("ASAM", "all", "elementwise", "inf", 0.01),
    "asamon_linf": ("ASAMON", "only_norm", "elementwise", "inf", 0.1),
    "asam_linf_nonorm": ("ASAM", "no_norm", "elementwise", "inf", 0.01),
    "ssamf": ("SSAM", "all", None, 2, 0.2),
    "ssamd": ("SSAM", "all", None, 2, 0.2),
}
FILES = {(aug, m, v): DIR / ("autoaugment" if aug else "") / f"cifar100_{m}_{v}.yaml"
         for aug in (False, True) for m in MODELS for v in VARIANTS}
# the offline digits demo (scripts/demos/run_demos.sh sam): variant -> (optimizer class, perturb, adaptive, rho)
DIGITS = {"sam": ("SAM", "all", None, 0.05), "samon": ("SAMON", "only_norm", None, 0.5),
          "asamon": ("ASAMON", "only_norm", "elementwise", 1.0)}
DIGITS_FILES = {v: DIR / f"digits_{v}.yaml" for v in ("sgd", *DIGITS)}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def build(spec: dict, *args, **extra):
    module, name = spec["class_path"].rsplit(".", 1)
    kwargs = dict(spec.get("init_args") or {})
    for key, value in kwargs.items():
        if isinstance(value, dict) and "class_path" in value:  # nested callable (base_optimizer)
            kwargs[key] = lambda params, v=value: build(v, params)
    return getattr(importlib.import_module(module), name)(*args, **kwargs, **extra)


def test_family_is_complete():
    shipped = set(DIR.rglob("*.yaml"))
    assert shipped == set(FILES.values()) | set(DIGITS_FILES.values())
    assert all((DIR.parent / rel).is_file() for rel in FITTED)


@pytest.mark.parametrize("key", sorted(FILES), ids=lambda k: f"{'aa-' if k[0] else ''}{k[1]}-{k[2]}")
def test_paper_setup_and_rho(key):
    aug, model, variant = key
    cfg = load(FILES[key])
    init = cfg["model"]["init_args"]
    assert cfg["trainer"]["max_epochs"] == 200 and cfg["data"]["init_args"]["batch_size"] == 128
    assert cfg["data"]["init_args"]["augment"] == ("autoaugment" if aug else "standard")
    assert init["backbone"] == MODELS[model] and init["label_smoothing"] == 0.1
    assert init["lr_scheduler"]["class_path"].endswith("CosineAnnealingLR")
    assert init["lr_scheduler"]["init_args"]["T_max"] == 200
    cls, perturb, adaptive, p, rho = VARIANTS[variant]
    opt = init["optimizer"]
    base = opt if cls is None else opt["init_args"]["base_optimizer"]
    assert base["class_path"] == "torch.optim.SGD"
    assert base["init_args"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4}
    if cls is None:
        return
    args = opt["init_args"]
    assert opt["class_path"] == f"lightning_methods.optim.{cls}"
    assert (args["rho"], args["perturb"], args.get("adaptive"), args.get("p", 2)) == (rho, perturb, adaptive, p)
    assert args["xi"] == (1e-7 if cls == "SSAM" else 1e-16)  # official constants
    if adaptive:
        assert args["eta"] == 0.0  # SAM-ON train.py default
    callbacks = cfg["trainer"].get("callbacks", [])
    if variant.startswith("ssam"):
        assert callbacks[0]["init_args"]["mode"] == ("fisher" if variant == "ssamf" else "dynamic")
        assert args["mask_init"] == ("zeros" if variant == "ssamf" else "random")
        # spec: sparsity 0.5 (every README example), full-gradient norm (official), masks refreshed every epoch; SSAM-F
        # 128 Fisher samples, SSAM-D drop rate 0.5, drop by |grad|, grow at random
        assert (args["sparsity"], args["mask_norm"], callbacks[0]["init_args"]["update_freq"]) == (0.5, "full", 1)
        mask_args = {k: v for k, v in callbacks[0]["init_args"].items() if k not in ("mode", "update_freq", "seed")}
        assert mask_args == ({"num_samples": 128} if variant == "ssamf" else
                             {"drop_rate": 0.5, "drop_score": "gradient", "grow_score": "random"})
    else:
        assert not callbacks


# `# paper:` lines: the SAM-ON teaser figure (WRN-28-10, CIFAR-100, basic augmentation), best rho per variant (spec
# table "WRN-28-10 on CIFAR-100, SAM-ON setup"); the other files have no number of their own (SAM-ON Table 1 and the
# SSAM tables are not reproduced in the spec), the no-norm rows only for ASAM elementwise (about 81.4).
PAPER_WRN28_10 = {"sgd": 80.7, "sam": 83.6, "samon": 84.2, "asam_elementwise": 83.8, "asamon_elementwise": 84.7,
                  "asam_elementwise_nonorm": 81.4, "asam_layerwise": 83.55, "asamon_layerwise": 84.35,
                  "asam_linf": 83.25, "asamon_linf": 84.75}


@pytest.mark.parametrize("key", sorted(FILES), ids=lambda k: f"{'aa-' if k[0] else ''}{k[1]}-{k[2]}")
def test_paper_lines_match_the_spec(key):
    aug, model, variant = key
    teaser = not aug and model == "wrn28_10" and variant in PAPER_WRN28_10
    assert paper_numbers(FILES[key]) == ({"test/acc": PAPER_WRN28_10[variant]} if teaser else {})


@pytest.mark.parametrize("key", sorted(k for k in FILES if k[0] or k[1] != "resnet56"),
                         ids=lambda k: f"{'aa-' if k[0] else ''}{k[1]}-{k[2]}")
def test_same_as_resnet56_sibling(key):
    """Files differ from the basic ResNet-56 file of their variant only in backbone, augmentation and run name."""
    cfg, ref = load(FILES[key]), copy.deepcopy(load(FILES[(False, "resnet56", key[2])]))
    ref["model"]["init_args"]["backbone"] = cfg["model"]["init_args"]["backbone"]
    ref["data"]["init_args"]["augment"] = cfg["data"]["init_args"]["augment"]
    ref["trainer"]["logger"]["init_args"]["name"] = cfg["trainer"]["logger"]["init_args"]["name"]
    assert cfg == ref


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_optimizer_and_callbacks_build_and_step(variant):
    cfg = load(FILES[(False, "resnet56", variant)])
    torch.manual_seed(0)
    model = TinyNet(num_classes=5, width=4)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    opt = build(cfg["model"]["init_args"]["optimizer"], param_groups_by_role(model))
    sched = build(cfg["model"]["init_args"]["lr_scheduler"], opt)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(sam_closure(model, lambda: F.cross_entropy(model(x), y)))
    sched.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for cb in cfg["trainer"].get("callbacks", []):
        build(cb)


@pytest.mark.parametrize("variant", sorted(DIGITS))
def test_digits_demo_differs_from_its_sgd_baseline_only_in_the_optimizer(variant):
    """A variant of the digits demo is digits_sgd.yaml with the SGD wrapped in its SAM optimizer (same SGD settings),
    so the demo compares optimizers and nothing else."""
    cfg, ref = load(DIGITS_FILES[variant]), load(DIGITS_FILES["sgd"])
    cls, perturb, adaptive, rho = DIGITS[variant]
    opt = cfg["model"]["init_args"].pop("optimizer")
    sgd = ref["model"]["init_args"].pop("optimizer")
    assert opt["class_path"] == f"lightning_methods.optim.{cls}"
    args = dict(opt["init_args"])
    assert args.pop("base_optimizer") == sgd
    assert args == {"rho": rho, "perturb": perturb, **({"adaptive": adaptive} if adaptive else {})}
    assert cfg["trainer"]["logger"]["init_args"].pop("name") == f"digits-{variant}"
    ref["trainer"]["logger"]["init_args"].pop("name")
    assert cfg == ref
    assert ref["data"]["class_path"].endswith("DigitsDataModule") and ref["data"]["init_args"]["augment"] == "crop"
