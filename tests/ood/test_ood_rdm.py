"""The RDM score network, its training loss, the EMA callback and RDMModule training / resume / scoring, with
golden values of the official RDM code (limchaos/Likelihood-OOD: SimpleMLP, get_sde_loss_fn,
ExponentialMovingAverage)."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from ood_helpers import TINY_RDM, fill_by_name, gaussian_features, official_net

from lightning_methods.callbacks import WarmupEMA
from lightning_methods.ood.features import EmbeddingDataModule
from lightning_methods.ood.metrics import auroc
from lightning_methods.ood.rdm import RDMModule, dsm_loss
from lightning_methods.ood.rdm_settings import LikelihoodSettings, ScoreNetSettings, TrainingSettings
from lightning_methods.ood.score_net import ScoreMLP
from lightning_methods.ood.sde import make_sde

from helpers import quiet_trainer


@pytest.mark.parametrize("conditional", [False, True])
def test_score_net_matches_official_simple_mlp(conditional):
    net = official_net(conditional)
    x = torch.linspace(-1.5, 1.5, 4 * 6).reshape(4, 6)
    t = torch.tensor([0.1, 0.3, 0.7, 0.95]) * 999
    out = net(x, t, torch.tensor([1.0, 3.0, 2.0, 5.0]) if conditional else None)
    golden = {False: ([-0.25625187158584595, -0.27451038360595703, -0.25677311420440674], -4.5137864500284195),
              True: ([-0.25572866201400757, -0.2739112675189972, -0.25617632269859314], -4.5085718631744385)}
    first, total = golden[conditional]
    # float32 on both sides: each output goes through about 100 rounded operations (fan-ins 6, 8, 16, 12 of the input
    # projection, time embedding, two blocks and output layer) on terms of size <= 2 (the largest hidden value);
    # independent roundings give sqrt(100) * eps32 * 2 = 2.4e-6 per output (the conditional and unconditional nets
    # differ by 5e-4), and the sum of the 12 outputs at most 12 times that.
    atol = 100**0.5 * torch.finfo(torch.float32).eps * 2
    torch.testing.assert_close(out[0, :3].double(), torch.tensor(first, dtype=torch.float64), rtol=0, atol=atol)
    assert out.double().sum().item() == pytest.approx(total, rel=0, abs=out.numel() * atol)


def test_official_state_dict_loads_and_zero_init():
    net = ScoreMLP(6, 16, 12, 2, 8)
    official = fill_by_name(ScoreMLP(6, 16, 12, 2, 8, context_dim=8).state_dict())  # has context entries
    net.load_official_state_dict(official)
    assert torch.equal(net.input_proj.weight, official["input_proj.weight"])
    fresh = ScoreMLP(6, 16, 12, 2, 8)
    assert torch.count_nonzero(fresh(torch.randn(3, 6), torch.rand(3))) == 0  # zero-initialised output layer
    assert fresh.num_parameters() == sum(p.numel() for p in fresh.parameters())
    with pytest.raises(ValueError, match="conditional"):
        ScoreMLP(6, 16, 12, 1, 8, context_dim=8)(torch.randn(2, 6), torch.rand(2))


@pytest.mark.parametrize("name,plain,weighted", [("vp", 0.8278539180755615, 9.370972633361816),
                                                  ("subvp", 0.8273850083351135, 11.572033882141113)])
def test_dsm_loss_matches_official(name, plain, weighted):
    net, sde = official_net(), make_sde(name)
    x = torch.linspace(-1.5, 1.5, 3 * 6).reshape(3, 6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # the official loss draws t, then the noise, from the global generator
        t = torch.rand(3) * (1 - 1e-5) + 1e-5
        noise = torch.randn_like(x)
    # float32: the network's ~100 rounded operations per output plus ~20 for the SDE terms and the squared error,
    # independent roundings: sqrt(120) * eps32 = 1.3e-6 relative (the vp and subvp losses differ by 6e-4)
    rel = 120**0.5 * torch.finfo(torch.float32).eps
    assert dsm_loss(net, sde, x, t, noise).mean().item() == pytest.approx(plain, rel=rel)
    assert dsm_loss(net, sde, x, t, noise, likelihood_weighting=True).mean().item() == pytest.approx(weighted, rel=rel)


class _Scripted(L.LightningModule):
    """Sets its weights to w_k = w_0 + 0.5 k (1, 3) at optimizer step k (manual optimization)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        k = self.global_step + 1
        with torch.no_grad():
            self.w.copy_(torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 * k * torch.tensor([1.0, 3.0]))
        self.optimizers().step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_warmup_ema_matches_official_ema(one_thread):
    module = _Scripted()
    trainer = quiet_trainer(max_steps=5, callbacks=[WarmupEMA(0.9999)])
    trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(5, 1), batch_size=1))
    # official ExponentialMovingAverage(decay 0.9999) after the same five updates
    torch.testing.assert_close(module.w.detach(), torch.tensor([3.2000999000999, 4.600299700299701],
                                                               dtype=torch.float64), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="decay"):
        WarmupEMA(1.5)


def _dm(n=512, batch=128, **kwargs):
    train = gaussian_features(n, 2, seed=0)
    test, far = gaussian_features(128, 2, seed=1), gaussian_features(128, 2, seed=2, shift=4.0)
    return EmbeddingDataModule.from_sets(train, {"id": test, "far": far}, variant="raw", pca_dim=None,
                                         batch_size=batch, **kwargs)


def test_rdm_learns_and_scores_through_the_predict_loop(one_thread):
    torch.manual_seed(0)
    model = RDMModule(dim=2, training=TrainingSettings(warmup_steps=10), net=ScoreNetSettings(**TINY_RDM),
                      optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0))
    trainer = quiet_trainer(max_epochs=25, gradient_clip_val=1.0, callbacks=[WarmupEMA(0.99)])
    dm = _dm()
    trainer.fit(model, datamodule=dm)
    out = trainer.predict(model, datamodule=dm)
    logp_id = torch.cat([o["logp"] for o in out[0]])
    logp_far = torch.cat([o["logp"] for o in out[1]])
    assert logp_id.dtype == torch.float64 and len(logp_id) == 128
    assert auroc(logp_id.numpy(), logp_far.numpy()) > 0.95
    true = torch.distributions.Normal(0.0, 1.0).log_prob(dm.sets["predict/id"].features).sum(1).double()
    assert (logp_id - true).abs().mean() < 1.0  # a density close to the true one after a short training


def test_rdm_resume_gives_the_same_weights(tmp_path, one_thread):
    def fit(epochs, run, ckpt=None):
        torch.manual_seed(0)
        model = RDMModule(dim=2, training={"warmup_steps": 3}, net=TINY_RDM)
        trainer = quiet_trainer(max_epochs=epochs, gradient_clip_val=1.0, enable_checkpointing=True,
                                default_root_dir=tmp_path / run, callbacks=[
                                    WarmupEMA(0.9), L.pytorch.callbacks.ModelCheckpoint(tmp_path / run, "last")])
        trainer.fit(model, datamodule=_dm(n=96, batch=32), ckpt_path=ckpt)
        return model

    full = fit(2, "full")
    fit(1, "half")
    resumed = fit(2, "resumed", ckpt=str(tmp_path / "half" / "last.ckpt"))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rdm_options_and_bad_input():
    with pytest.raises(ValueError, match="schedule"):
        RDMModule(dim=2, training={"schedule": "cosine"})
    with pytest.raises(TypeError, match="argument 'sde' has no field.*'width'"):
        RDMModule(dim=2, sde={"width": 3})
    model = RDMModule(dim=2, num_classes=3, net=TINY_RDM)
    with pytest.raises(KeyError, match="context"):
        model.loss({"feature": torch.zeros(2, 2)})
    assert model.loss({"feature": torch.zeros(2, 2), "context": torch.tensor([1.0, 2.0])}).isfinite()


def test_injected_optimizer_and_settings_survive_a_checkpoint(tmp_path, one_thread):
    """The default optimizer is the RDM code's AdamW(2e-3, wd 0): an explicitly injected AdamW with those values trains
    to bit-identical weights; an injected optimizer and the settings dataclasses round-trip through a weights-only
    checkpoint."""
    def fit(run, **kwargs):
        torch.manual_seed(0)
        model = RDMModule(dim=2, training=TrainingSettings(warmup_steps=2), net=ScoreNetSettings(**TINY_RDM),
                          **kwargs)
        trainer = quiet_trainer(max_epochs=2, enable_checkpointing=True, default_root_dir=tmp_path / run,
                                callbacks=[L.pytorch.callbacks.ModelCheckpoint(tmp_path / run, "last")])
        trainer.fit(model, datamodule=_dm(n=64, batch=32))
        return model, trainer

    default, _ = fit("default")
    explicit, _ = fit("explicit", optimizer=partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.0))
    for a, b in zip(default.state_dict().values(), explicit.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sgd, trainer = fit("sgd", optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.5),
                       likelihood={"state_dtype": "float32", "rtol": 1e-4})
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and trainer.optimizers[0].defaults["momentum"] == 0.5
    assert any(not torch.equal(a, b) for a, b in zip(default.state_dict().values(), sgd.state_dict().values()))
    loaded = RDMModule.load_from_checkpoint(tmp_path / "sgd" / "last.ckpt", weights_only=True)
    assert loaded.likelihood_settings == LikelihoodSettings(state_dtype="float32", rtol=1e-4)
    assert loaded.net_settings == ScoreNetSettings(**TINY_RDM) and loaded.training_settings.warmup_steps == 2
    opt = loaded.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.5
    for a, b in zip(sgd.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
