"""RDMModule: a representation-space diffusion model (RDM) trained on frozen-encoder features and scored by its exact
PF-ODE log-likelihood ("Revisiting Likelihood-Based OOD Detection by Modeling Representations", arXiv 2504.07793;
official code limchaos/Likelihood-OOD), the per-encoder density model of EncMin2L (arXiv 2605.20502).

Training is continuous-time denoising score matching (:func:`dsm_loss`; mean over dimensions, no likelihood weighting
by default) with AdamW, a linear learning-rate warm-up (or the official script's one-cycle schedule), gradient clipping
through ``Trainer(gradient_clip_val=1)`` and an EMA of the weights through
:class:`lightning_methods.callbacks.WarmupEMA`.
``predict_step`` returns the log-likelihood of every sample (float64), so scoring runs through the Trainer's predict
loop on one or many devices. Batches are dicts ``{"feature": (B, d), "index": (B,), ["context": (B,)]}``
(:class:`lightning_methods.ood.EmbeddingDataModule`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from ..utils import seeded_generator
from .likelihood import Trace, pf_ode_likelihood
from .score_net import ScoreMLP
from .sde import SDE, SDEName, make_sde


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
        sde: ``"vp"`` (package default, the EncMin2L setting), ``"subvp"`` (RDM code default) or ``"ve"``.
        beta_min: VP / sub-VP ``beta(0)`` (0.2).
        beta_max: VP / sub-VP ``beta(1)`` (20).
        sigma_min: VE ``sigma(0)`` (0.01).
        sigma_max: VE ``sigma(1)`` (50).
        width: hidden width of the score MLP (1536).
        bottleneck: block bottleneck width (1536).
        num_blocks: residual blocks (12).
        time_embed_dim: timestep embedding size (256).
        dropout: dropout inside the blocks (0).
        num_classes: classes of the conditional variant's context (``None`` = unconditional, the default).
        context_dim: context embedding size of the conditional variant (256).
        lr: AdamW learning rate (2e-3).
        weight_decay: AdamW weight decay (0).
        warmup_steps: linear warm-up length in optimizer steps (2000); the factor is ``min(step / warmup, 1)``.
        schedule: ``"warmup"`` (warm-up, then constant; score_sde's ``optimization_manager``) or ``"onecycle"``
            (the RDM script ``train_con``: OneCycleLR, 5% warm-up, cosine decay) or ``"constant"``.
        t_eps: smallest training time (1e-5).
        likelihood_weighting: weight the loss by ``g(t)^2`` (off in the RDM code).
        seed: seed of the training times and noise (drawn from ``(seed, global_step, rank)``, so resumed runs draw
            the same).
        trace: divergence of the PF-ODE: ``"auto"``, ``"exact"`` or ``"hutchinson"``.
        n_probes: Hutchinson probes per sample (1).
        probe_seed: seed of the Hutchinson probes (drawn from ``(probe_seed, index)``).
        ode_method: torchdiffeq solver (``"fehlberg2"``).
        ode_rtol: relative tolerance (1e-5).
        ode_atol: absolute tolerance (1e-5).
        ode_eps: start time of the likelihood integration (1e-5).
        ode_state_dtype: ``"float64"`` (default) or ``"float32"`` (the official path).
        per_sample_error: adaptive step control by the worst sample instead of the batch RMS.
        ode_step_size: step of a fixed-grid solver (``ode_method="rk4"``): batch-independent scores.
    """

    def __init__(
        self,
        dim: int,
        sde: SDEName = "vp",
        beta_min: float = 0.2,
        beta_max: float = 20.0,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        width: int = 1536,
        bottleneck: int = 1536,
        num_blocks: int = 12,
        time_embed_dim: int = 256,
        dropout: float = 0.0,
        num_classes: int | None = None,
        context_dim: int = 256,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 2000,
        schedule: Literal["warmup", "onecycle", "constant"] = "warmup",
        t_eps: float = 1e-5,
        likelihood_weighting: bool = False,
        seed: int = 0,
        trace: Trace = "auto",
        n_probes: int = 1,
        probe_seed: int = 0,
        ode_method: str = "fehlberg2",
        ode_rtol: float = 1e-5,
        ode_atol: float = 1e-5,
        ode_eps: float = 1e-5,
        ode_state_dtype: Literal["float64", "float32"] = "float64",
        per_sample_error: bool = False,
        ode_step_size: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if schedule not in ("warmup", "onecycle", "constant"):
            raise ValueError(f"schedule must be 'warmup', 'onecycle' or 'constant', got {schedule!r}")
        if ode_state_dtype not in ("float64", "float32"):
            raise ValueError(f"ode_state_dtype must be 'float64' or 'float32', got {ode_state_dtype!r}")
        self.sde = make_sde(sde, beta_min, beta_max, sigma_min, sigma_max)
        self.conditional = num_classes is not None
        self.net = ScoreMLP(dim, width, bottleneck, num_blocks, time_embed_dim, dropout,
                            context_dim if self.conditional else None)

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
        t = torch.rand(x.shape[0], device=x.device, generator=generator) * (self.sde.T - self.hparams.t_eps)
        t = t + self.hparams.t_eps
        noise = torch.randn(x.shape, device=x.device, generator=generator)
        return dsm_loss(self.net, self.sde, x, t, noise, self._context(batch),
                        self.hparams.likelihood_weighting).mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        gen = seeded_generator(self.hparams.seed, self.global_step, self.global_rank, device=self.device)
        loss = self.loss(batch, gen)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["feature"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        gen = seeded_generator(self.hparams.seed, 1_000_003, batch_idx, device=self.device)  # same draws each time
        loss = self.loss(batch, gen)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch["feature"]), sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return opt
        if hp.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, pct_start=0.05, cycle_momentum=False,
                                                        anneal_strategy="cos",
                                                        total_steps=max(int(self.trainer.estimated_stepping_batches),
                                                                        2))
        else:
            warmup = max(int(hp.warmup_steps), 0)
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
        hp = self.hparams

        def score_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            ctx = None if context is None else context.float().repeat(z.shape[0] // len(context))
            return self.sde.score(self.net(z, self.sde.time_input(t), ctx), t)

        with torch.autocast(device_type=x.device.type, enabled=False):
            result = pf_ode_likelihood(
                score_fn, self.sde, x, trace=hp.trace, n_probes=hp.n_probes, index=index, seed=hp.probe_seed,
                eps=hp.ode_eps, method=hp.ode_method, rtol=hp.ode_rtol, atol=hp.ode_atol,
                state_dtype=torch.float64 if hp.ode_state_dtype == "float64" else torch.float32,
                per_sample_error=hp.per_sample_error, step_size=hp.ode_step_size)
        return result.logp

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, torch.Tensor]:
        feature = batch["feature"]
        index = batch.get("index", torch.arange(len(feature), device=feature.device))
        logp = self.log_likelihood(feature, index, self._context(batch))
        return {"index": index, "logp": logp, "nll_per_dim": -logp / feature.shape[1]}
