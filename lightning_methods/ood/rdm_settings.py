"""Typed settings of :class:`lightning_methods.ood.RDMModule`, one dataclass per concern (SDE, score network, training,
likelihood). Defaults are the RDM official code's (arXiv 2504.07793, limchaos/Likelihood-OOD) unless marked.

LightningCLI / jsonargparse fill them from YAML dicts (``net: {width: 128, num_blocks: 3}``); Python code passes the
dataclasses or plain dicts (``RDMModule(dim=64, net=ScoreNetSettings(width=128))``). Checkpoints store them as plain
dicts, so they load with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Literal

from lightning_methods.ood.likelihood import Trace
from lightning_methods.ood.sde import SDEName


@dataclass
class SDESettings:
    """The forward SDE.

    Attributes:
        name: ``"vp"`` (package default, the EncMin2L setting), ``"subvp"`` (RDM code default) or ``"ve"``.
        beta_min: VP / sub-VP ``beta(0)`` (0.2).
        beta_max: VP / sub-VP ``beta(1)`` (20).
        sigma_min: VE ``sigma(0)`` (0.01).
        sigma_max: VE ``sigma(1)`` (50).
    """

    name: SDEName = "vp"
    beta_min: float = 0.2
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0


@dataclass
class ScoreNetSettings:
    """The score MLP (official ``SimpleMLP``).

    Attributes:
        width: hidden width (1536).
        bottleneck: block bottleneck width (1536).
        num_blocks: residual blocks (12).
        time_embed_dim: timestep embedding size (256).
        dropout: dropout inside the blocks (0).
        context_dim: context embedding size of the conditional variant (256).
    """

    width: int = 1536
    bottleneck: int = 1536
    num_blocks: int = 12
    time_embed_dim: int = 256
    dropout: float = 0.0
    context_dim: int = 256


@dataclass
class TrainingSettings:
    """Denoising score matching and the learning-rate schedule (the optimizer itself is ``RDMModule(optimizer=...)``).

    Attributes:
        warmup_steps: linear warm-up length in optimizer steps (2000); the factor is ``min(step / warmup, 1)``.
        schedule: ``"warmup"`` (warm-up, then constant; score_sde's ``optimization_manager``), ``"onecycle"`` (the RDM
            script ``train_con``: OneCycleLR to the optimizer's lr, 5% warm-up, cosine decay) or ``"constant"``.
        t_eps: smallest training time (1e-5).
        likelihood_weighting: weight the loss by ``g(t)^2`` (off in the RDM code).
        seed: seed of the training times and noise (drawn from ``(seed, global_step, rank)``, so resumed runs draw
            the same).
    """

    warmup_steps: int = 2000
    schedule: Literal["warmup", "onecycle", "constant"] = "warmup"
    t_eps: float = 1e-5
    likelihood_weighting: bool = False
    seed: int = 0


@dataclass
class LikelihoodSettings:
    """The PF-ODE log-likelihood (:func:`lightning_methods.ood.pf_ode_likelihood`).

    Attributes:
        trace: divergence: ``"auto"``, ``"exact"`` or ``"hutchinson"``.
        n_probes: Hutchinson probes per sample (1).
        probe_seed: seed of the Hutchinson probes (drawn from ``(probe_seed, index)``).
        method: torchdiffeq solver (``"fehlberg2"``).
        rtol: relative tolerance (1e-5).
        atol: absolute tolerance (1e-5).
        eps: start time of the integration (1e-5).
        state_dtype: ``"float64"`` (package default: the log-density change accumulates in float64) or ``"float32"``
            (the official path; the two pick different adaptive steps, see docs/methods/ood.md).
        per_sample_error: adaptive step control by the worst sample instead of the batch RMS.
        step_size: step of a fixed-grid solver (``method="rk4"``): batch-independent scores.
    """

    trace: Trace = "auto"
    n_probes: int = 1
    probe_seed: int = 0
    method: str = "fehlberg2"
    rtol: float = 1e-5
    atol: float = 1e-5
    eps: float = 1e-5
    state_dtype: Literal["float64", "float32"] = "float64"
    per_sample_error: bool = False
    step_size: float | None = None


def as_settings(cls: type, value: Any, argument: str) -> Any:
    """``value`` (``None``, a ``cls`` instance or a dict of its fields) as a ``cls`` instance.

    Raises:
        TypeError: ``value`` is another type, or a dict with a key that is not a field of ``cls`` (named).
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if is_dataclass(value) or not isinstance(value, dict):
        raise TypeError(f"RDMModule argument {argument!r} must be a {cls.__name__} or a dict of its fields, got "
                        f"{type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise TypeError(f"RDMModule argument {argument!r} has no field(s) {unknown}; {cls.__name__} has "
                        f"{sorted(known)}")
    return cls(**value)


def settings_dict(value: Any) -> dict[str, Any]:
    """A settings dataclass as a plain dict (for hyperparameters and checkpoints)."""
    return asdict(value) if is_dataclass(value) else dict(value)
