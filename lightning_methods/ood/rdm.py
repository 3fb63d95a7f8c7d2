"""RDMModule: a representation-space diffusion model (RDM) trained on frozen-encoder features and scored by its exact
PF-ODE log-likelihood ("Revisiting Likelihood-Based OOD Detection by Modeling Representations", arXiv 2504.07793;
official code limchaos/Likelihood-OOD), the per-encoder density model of EncMin2L (arXiv 2605.20502).

Training is continuous-time denoising score matching (:func:`dsm_loss`; mean over dimensions, no likelihood weighting
by default) with an injected optimizer (default: the RDM code's AdamW), a linear learning-rate warm-up (or the
official script's one-cycle schedule), gradient clipping through ``Trainer(gradient_clip_val=1)`` and an EMA of the
weights through :class:`lightning_methods.callbacks.WarmupEMA`. Settings come grouped in typed dataclasses
(:mod:`lightning_methods.ood.rdm_settings`) that LightningCLI fills from YAML.
``predict_step`` returns the log-likelihood of every sample (float64), so scoring runs through the Trainer's predict
loop on one or many devices. Batches are dicts ``{"feature": (B, d), "index": (B,), ["context": (B,)]}``
(:class:`lightning_methods.ood.EmbeddingDataModule`).
"""

from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from lightning_methods.hparams import callable_from_config, checkpoint_safe, describe_callable
from lightning_methods.ood.likelihood import pf_ode_likelihood
from lightning_methods.ood.rdm_settings import (
    LikelihoodSettings,
    ScoreNetSettings,
    SDESettings,
    TrainingSettings,
    as_settings,
    settings_dict,
)
from lightning_methods.ood.score_net import ScoreMLP
from lightning_methods.ood.sde import SDE, make_sde
from lightning_methods.utils import seeded_generator


def dsm_loss(net: torch.nn.Module, sde: SDE, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             context: torch.Tensor | None = None, likelihood_weighting: bool = False) -> torch.Tensor:
    """Per-sample denoising score-matching loss at times ``t`` with standard normal ``noise``.

    ``mean_dims (score * std + noise)^2`` (the RDM code's setting), or with ``likelihood_weighting``
    ``g(t)^2 mean_dims (score + noise / std)^2``.
    """
    std = sde.marginal_std(t)[:, None]
    perturbed = sde.perturb(x, t, noise)
    score = sde.score(net(perturbed, sde.time_input(t), context), t)
    if likelihood_weighting:
        return torch.square(score + noise / std).mean(dim=1) * sde.diffusion(t) ** 2
    return torch.square(score * std + noise).mean(dim=1)


class RDMModule(LightningModule):
    """Score network + SDE, trained on features and scored by likelihood.

    Args:
        dim: feature dimension (after PCA).
        num_classes: classes of the conditional variant's context (``None`` = unconditional, the default).
        optimizer: callable ``params -> Optimizer`` (LightningCLI's ``OptimizerCallable``); ``None`` means the RDM
            code's AdamW(lr 2e-3, weight decay 0).
        sde: :class:`SDESettings` (VP, beta 0.2 .. 20).
        net: :class:`ScoreNetSettings` (width 1536, 12 blocks, time embedding 256).
        training: :class:`TrainingSettings` (warm-up 2000 steps, t_eps 1e-5, no likelihood weighting, seed).
        likelihood: :class:`LikelihoodSettings` (fehlberg2, rtol = atol = 1e-5, 1 Rademacher probe, float64 state).

    Each settings argument also takes a dict of its fields (the YAML form).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int | None = None,
        optimizer: OptimizerCallable | None = None,
        sde: SDESettings | None = None,
        net: ScoreNetSettings | None = None,
        training: TrainingSettings | None = None,
        likelihood: LikelihoodSettings | None = None,
    ) -> None:
        super().__init__()
        self.sde_settings = as_settings(SDESettings, sde, "sde")
        self.net_settings = as_settings(ScoreNetSettings, net, "net")
        self.training_settings = as_settings(TrainingSettings, training, "training")
        self.likelihood_settings = as_settings(LikelihoodSettings, likelihood, "likelihood")
        # load_from_checkpoint / load_rdm hand back the {"class_path", "init_args"} form of the optimizer
        self.optimizer_factory = callable_from_config(optimizer, "optimizer")
        self.save_hyperparameters({
            "dim": dim, "num_classes": num_classes, "optimizer": describe_callable(optimizer),
            "sde": settings_dict(self.sde_settings), "net": settings_dict(self.net_settings),
            "training": settings_dict(self.training_settings), "likelihood": settings_dict(self.likelihood_settings)})
        tr, lk, s, n = self.training_settings, self.likelihood_settings, self.sde_settings, self.net_settings
        if tr.schedule not in ("warmup", "onecycle", "constant"):
            raise ValueError(f"training.schedule must be 'warmup', 'onecycle' or 'constant', got {tr.schedule!r}")
        if lk.state_dtype not in ("float64", "float32"):
            raise ValueError(f"likelihood.state_dtype must be 'float64' or 'float32', got {lk.state_dtype!r}")
        self.sde = make_sde(s.name, beta_min=s.beta_min, beta_max=s.beta_max, sigma_min=s.sigma_min,
                            sigma_max=s.sigma_max)
        self.conditional = num_classes is not None
        self.net = ScoreMLP(dim, width=n.width, bottleneck=n.bottleneck, num_blocks=n.num_blocks,
                            time_embed_dim=n.time_embed_dim, dropout=n.dropout,
                            context_dim=n.context_dim if self.conditional else None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # weights_only loads: callables as {"class_path", "init_args"}, settings dataclasses as dicts
        if "hyper_parameters" in checkpoint:
            hp = {k: settings_dict(v) if is_dataclass(v) else v for k, v in checkpoint["hyper_parameters"].items()}
            checkpoint["hyper_parameters"] = checkpoint_safe(hp, type(self))

    # ------------------------------------------------------------------------------------------- training
    def _context(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.conditional:
            return None
        if "context" not in batch:
            raise KeyError("a conditional RDM needs batches with a 'context' entry (1 + predicted class)")
        return batch["context"].float()

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean DSM loss of a batch, times and noise drawn from ``generator``."""
        x = batch["feature"].float()
        tr = self.training_settings
        t = torch.rand(x.shape[0], device=x.device, generator=generator) * (self.sde.T - tr.t_eps)
        t = t + tr.t_eps
        noise = torch.randn(x.shape, device=x.device, generator=generator)
        return dsm_loss(self.net, self.sde, x, t, noise, context=self._context(batch),
                        likelihood_weighting=tr.likelihood_weighting).mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        gen = seeded_generator(self.training_settings.seed, self.global_step, self.global_rank, device=self.device)
        loss = self.loss(batch, gen)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["feature"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # the same draws at every validation
        gen = seeded_generator(self.training_settings.seed, 1_000_003, batch_idx, device=self.device)
        loss = self.loss(batch, gen)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch["feature"]), sync_dist=True)

    def configure_optimizers(self) -> Any:
        tr = self.training_settings
        if self.optimizer_factory is None:
            opt = torch.optim.AdamW(self.net.parameters(), lr=2e-3, weight_decay=0.0)  # the RDM code's
        else:
            opt = self.optimizer_factory(self.net.parameters())
        if tr.schedule == "constant":
            return opt
        if tr.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                        pct_start=0.05, cycle_momentum=False, anneal_strategy="cos",
                                                        total_steps=max(int(self.trainer.estimated_stepping_batches),
                                                                        2))
        else:
            warmup = max(int(tr.warmup_steps), 0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / warmup, 1.0) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- scoring
    def log_likelihood(self, feature: torch.Tensor, index: torch.Tensor | None = None,
                       context: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample ``log p_0`` (float64) by the PF-ODE with this module's settings (autocast off)."""
        with torch.inference_mode(False):  # the predict loop runs in inference mode; the divergence needs autograd
            x = feature.float().clone()
            index = None if index is None else index.clone()
            context = None if context is None else context.clone()
            return self._log_likelihood(x, index, context)

    def _log_likelihood(self, x: torch.Tensor, index: torch.Tensor | None, context: torch.Tensor | None
                        ) -> torch.Tensor:
        lk = self.likelihood_settings

        def score_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            ctx = None if context is None else context.float().repeat(z.shape[0] // len(context))
            return self.sde.score(self.net(z, self.sde.time_input(t), ctx), t)

        with torch.autocast(device_type=x.device.type, enabled=False):
            result = pf_ode_likelihood(
                score_fn, self.sde, x, trace=lk.trace, n_probes=lk.n_probes, index=index, seed=lk.probe_seed,
                eps=lk.eps, method=lk.method, rtol=lk.rtol, atol=lk.atol,
                state_dtype=torch.float64 if lk.state_dtype == "float64" else torch.float32,
                per_sample_error=lk.per_sample_error, step_size=lk.step_size)
        return result.logp

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, torch.Tensor]:
        feature = batch["feature"]
        index = batch.get("index", torch.arange(len(feature), device=feature.device))
        logp = self.log_likelihood(feature, index, self._context(batch))
        return {"index": index, "logp": logp, "nll_per_dim": -logp / feature.shape[1]}
