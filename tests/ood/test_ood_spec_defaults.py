"""The EncMin2L spec's defaults (Hyperparameters table) in the code and in the CIFAR-100 config: the RDM code's SDE,
score network, training and likelihood settings with VP as the package's SDE, the pipeline's calibration, fusion and
diagnostics defaults."""

from __future__ import annotations

from pathlib import Path

import yaml

from lightning_methods.ood.cli import build_parser
from lightning_methods.ood.config import DiagnosticsConfig, FusionConfig, IDConfig, OODSetConfig, RDMConfig
from lightning_methods.ood.rdm_settings import LikelihoodSettings, ScoreNetSettings, SDESettings, TrainingSettings
from lightning_methods.ood.sde import VPSDE, make_sde

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ood" / "cifar100_encmin2l.yaml"

SDE = {"name": "vp", "beta_min": 0.2, "beta_max": 20.0}
NET = {"width": 1536, "bottleneck": 1536, "num_blocks": 12, "time_embed_dim": 256}
LIKELIHOOD = {"n_probes": 1, "method": "fehlberg2", "rtol": 1e-5, "atol": 1e-5, "eps": 1e-5}
RDM = {"batch_size": 4096, "max_epochs": 200, "ema_decay": 0.9999, "gradient_clip_val": 1.0, "conditional": False}
CORRUPTIONS = ["gaussian_noise", "gaussian_blur", "jpeg_compression"]


def _fields(obj: object, names: dict) -> dict:
    return {k: getattr(obj, k) for k in names}


def test_code_defaults_are_the_spec_values():
    assert _fields(SDESettings(), SDE) == SDE
    assert _fields(ScoreNetSettings(), NET) == NET
    training = TrainingSettings()
    assert (training.warmup_steps, training.t_eps, training.likelihood_weighting) == (2000, 1e-5, False)
    assert _fields(LikelihoodSettings(), LIKELIHOOD) == LIKELIHOOD
    assert _fields(RDMConfig(), RDM) == RDM
    assert FusionConfig().recalibration == "ecdf"
    diag = DiagnosticsConfig()
    assert (diag.corruptions, diag.severity, diag.selection, diag.standardize) == (CORRUPTIONS, 3, "top1_union",
                                                                                   False)
    assert IDConfig().calib_fractions == [0.1, 0.1] and OODSetConfig("x").severity == 3
    assert isinstance(make_sde(), VPSDE) and VPSDE().T == 1.0
    parser = build_parser()
    assert parser.get_default("variants") == ["raw", "standardize", "l2"] and parser.get_default("pca_dim") == 768


def test_cifar100_config_holds_the_spec_values():
    raw = yaml.safe_load(CONFIG.read_text())
    rdm, module = raw["rdm"], raw["rdm"]["module"]
    assert module["optimizer"] == {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-3, "weight_decay": 0.0}}
    assert {k: module["sde"][k] for k in SDE} == SDE
    assert {k: module["net"][k] for k in NET} == NET
    assert module["training"]["warmup_steps"] == 2000
    assert {k: module["likelihood"][k] for k in LIKELIHOOD} == LIKELIHOOD and module["likelihood"]["trace"] in (
        "hutchinson", "auto")  # d = 768 after PCA: Hutchinson either way
    assert {k: rdm[k] for k in RDM} == RDM
    assert raw["variants"] == ["raw", "standardize", "l2"] and raw["pca_dim"] == 768
    assert raw["fusion"]["recalibration"] == "ecdf" and raw["fusion"]["fpr_convention"] == "v1.5"
    assert raw["diagnostics"]["corruptions"] == CORRUPTIONS and raw["diagnostics"]["severity"] == 3
    assert raw["diagnostics"]["selection"] == "top1_union"
    groups = {s["name"]: s["group"] for s in raw["ood"]}  # OpenOOD v1.5, CIFAR-100 as ID
    assert {n for n, g in groups.items() if g == "near"} == {"cifar10", "tin"}
    assert {n for n, g in groups.items() if g == "far"} == {"mnist", "svhn", "textures", "places365"}


def test_default_optimizer_and_linear_warmup():
    """The RDM code's AdamW(lr 2e-3, wd 0) and score_sde's warm-up ``lr x min(step / warmup, 1)``, step counted from 0
    (the first update runs at lr 0)."""
    from lightning_methods.ood.rdm import RDMModule

    module = RDMModule(dim=2, net={"width": 8, "bottleneck": 8, "num_blocks": 1, "time_embed_dim": 4},
                       training={"warmup_steps": 4})
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(opt).__name__ == "AdamW" and opt.defaults["weight_decay"] == 0.0
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [2e-3 * min(s / 4, 1.0) for s in range(6)]
