"""``NonFiniteGuard``: stop a diverged run within a step or two, without a per-step host sync, and keep its last good
checkpoint.

A run with a far too large learning rate (or KOALA++ with extreme ``sigma`` / ``q``) used to finish with exit code 0
and NaN losses for the whole run, and overwrite its checkpoints with NaN weights. This callback:

- after every training step folds ``~isfinite(loss)`` into a flag **on the device** (and, every
  ``param_check_every_n_steps`` steps, ``~isfinite`` of every parameter and floating-point buffer: with BatchNorm a
  diverging run can keep a finite loss while ``running_var`` overflows); under DDP the flag is all-reduced on the
  device, so every rank decides at the same step;
- looks at the flag on the host without stalling the device: on CUDA the flag is copied into pinned memory with a
  non-blocking copy and read ``lag_steps`` steps later (after waiting on that copy's event only, which the device
  finished long ago), so a fault is seen at most ``lag_steps`` steps after it happened; on the CPU it is read at once;
- checks the loss flag, every parameter and every buffer synchronously right before any checkpoint is written
  (``on_save_checkpoint``) and at the end of training, so NaN weights never reach a checkpoint file;
- stops with :class:`NonFiniteTrainingError` (the command exits non-zero) naming the step, the likely cause (the
  optimizer's learning rate and other unstable settings, fp16 overflow) and the last good checkpoint, which is left
  intact (``lightning_methods.checkpoint_io.SafeCheckpointIO`` would refuse to overwrite it with NaN weights too).

Optionally (``divergence_factor``, off by default) it also stops a run whose loss stays finite but has diverged (KOALA++
with lr 1000 reaches a loss of 1e7 and 10% accuracy without a NaN): the training loss is smoothed on the device (an
exponential moving average over about 10 steps), and the run stops when the smoothed loss exceeds ``divergence_factor``
times its running minimum (from the first step on: noise at the start only raises the loss; the minimum is floored at
``divergence_floor`` so that a loss near zero does not make every small rise a divergence). Same device-side flag,
same lag, same report, with :class:`DivergedTrainingError`.

The CLI adds it to every run (``--nonfinite_guard.*``; ``--nonfinite_guard.enabled false`` turns it off;
``--nonfinite_guard.divergence_factor 100`` stops a loss that grew a hundredfold).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from lightning_methods.utils.distributed import is_distributed

#: optimizer hyperparameters worth naming when a run diverges (lr always; the KOALA family's sigma / q; SAM's rho)
SUSPECTS = ("lr", "rho", "sigma", "sigma_x", "sigma_v", "q", "q_x", "q_v", "momentum", "weight_decay")


class NonFiniteTrainingError(RuntimeError):
    """The training loss or a parameter became NaN or inf."""


class DivergedTrainingError(NonFiniteTrainingError):
    """The smoothed training loss grew past ``divergence_factor`` times its running minimum (NonFiniteGuard option)."""


class NonFiniteGuard(Callback):
    """Stop training when the training loss or a parameter becomes NaN/inf (see the module docstring).

    Args:
        enabled: turn the guard on or off.
        lag_steps: on CUDA, how many steps after a step its flag is read on the host (>= 1; a fault is reported at
            most this many steps late). On the CPU the flag is read after every step.
        param_check_every_n_steps: also check every parameter every this many steps (0: only before checkpoints and
            at the end of training; a non-finite parameter usually makes the next loss non-finite anyway).
        divergence_factor: stop when the smoothed training loss exceeds this many times its running minimum (e.g.
            ``100``: two orders of magnitude); ``None`` (default) turns the check off.
        divergence_floor: the running minimum is at least this (a loss near zero would make any rise look huge).
        divergence_smoothing: weight of the past in the moving average of the loss (0.9: about 10 steps).
    """

    #: The last sentence of the error: what to change, in the options of the command that runs the guard.
    remedy = "Lower it, or clip gradients with --model.init_args.grad_clip_norm 1.0"

    def __init__(self, enabled: bool = True, lag_steps: int = 2, param_check_every_n_steps: int = 10,
                 divergence_factor: float | None = None, divergence_floor: float = 1e-2,
                 divergence_smoothing: float = 0.9) -> None:
        if lag_steps < 1:
            raise ValueError(f"lag_steps must be >= 1, got {lag_steps}")
        if param_check_every_n_steps < 0:
            raise ValueError(f"param_check_every_n_steps must be >= 0, got {param_check_every_n_steps}")
        if divergence_factor is not None and not divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1 (or None to turn the check off), got {divergence_factor}")
        if not divergence_floor > 0 or not 0 <= divergence_smoothing < 1:
            raise ValueError("need divergence_floor > 0 and 0 <= divergence_smoothing < 1, got "
                             f"{divergence_floor}, {divergence_smoothing}")
        self.enabled, self.lag_steps, self.param_check_every_n_steps = enabled, lag_steps, param_check_every_n_steps
        self.divergence_factor = divergence_factor
        self.divergence_floor, self.divergence_smoothing = divergence_floor, divergence_smoothing
        self._ema: torch.Tensor | None = None  # on the device: the smoothed loss and its running minimum
        self._ema_min: torch.Tensor | None = None
        self._flag: torch.Tensor | None = None  # device uint8: 1 bit = loss non-finite, 2 = a parameter
        self._ring: list[tuple[torch.Tensor, Any, int]] = []  # (pinned host copy, cuda event, step) per slot
        self._steps = 0
        self._restored: dict[str, float | None] = {}  # the smoothed loss and minimum of a resumed run's checkpoint
        self._lag_on_cpu = False  # tests: exercise the lagged (CUDA) path on the CPU

    # --------------------------------------------------------------------------------------------- device side
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flag = torch.zeros((), dtype=torch.uint8, device=pl_module.device)
        self._ring, self._steps = [], 0
        self._ema, self._ema_min = (None if self._restored.get(k) is None else  # a resume goes on smoothing
                                    torch.tensor(self._restored[k], dtype=torch.float32, device=pl_module.device)
                                    for k in ("ema", "ema_min"))
        self._restored = {}

    def state_dict(self) -> dict[str, Any]:
        """The smoothed loss and its running minimum of the divergence check (floats; ``None`` before the first
        step or with the check off), so a resumed run stops where the uninterrupted one would."""
        return {k: None if v is None else float(v) for k, v in (("ema", self._ema), ("ema_min", self._ema_min))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # made tensors on the module's device in on_train_start

    @staticmethod
    def _loss_of(outputs: Any) -> torch.Tensor | None:
        if isinstance(outputs, dict):
            outputs = outputs.get("loss")
        return outputs if isinstance(outputs, torch.Tensor) else None

    @staticmethod
    def _state(pl_module: LightningModule) -> list[tuple[str, torch.Tensor]]:
        """Floating-point parameters and buffers (BatchNorm statistics overflow while the loss is still finite)."""
        named = [*pl_module.named_parameters(), *pl_module.named_buffers()]
        return [(n, t) for n, t in named if t.is_floating_point() and t.numel()]

    def _params_bad(self, pl_module: LightningModule) -> torch.Tensor:
        flags = [torch.isfinite(t.detach()).all() for _, t in self._state(pl_module)]
        if not flags:
            return torch.zeros((), dtype=torch.bool, device=pl_module.device)
        return ~torch.stack([f.to(pl_module.device) for f in flags]).all()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled or self._flag is None:
            return
        self._steps += 1
        loss = self._loss_of(outputs)
        if loss is not None:
            self._flag |= (~torch.isfinite(loss.detach()).all()).to(torch.uint8)
            if self.divergence_factor is not None:
                self._flag |= self._diverged(loss.detach()).to(torch.uint8) * 4
        n = self.param_check_every_n_steps
        if n and self._steps % n == 0:
            self._flag |= self._params_bad(pl_module).to(torch.uint8) * 2
        flag = self._flag
        if is_distributed():
            flag = flag.clone()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # enqueued on the device
        if flag.device.type != "cuda" and not self._lag_on_cpu:
            value = int(flag)  # CPU: no device to wait for
            if value:
                self._stop(trainer, pl_module, value, self._steps)
            return
        self._poll_lagged(trainer, pl_module, flag)

    def _diverged(self, loss: torch.Tensor) -> torch.Tensor:
        """Update the smoothed loss and its running minimum on the device; ``True`` (a device bool) when the smoothed
        loss exceeds ``divergence_factor`` times the floored minimum. Non-finite losses are left to bit 1."""
        value = loss.float().mean()
        value = torch.where(torch.isfinite(value), value, torch.zeros_like(value))
        beta = self.divergence_smoothing
        self._ema = value if self._ema is None else beta * self._ema + (1 - beta) * value
        self._ema_min = self._ema.clone() if self._ema_min is None else torch.minimum(self._ema_min, self._ema)
        return self._ema > self.divergence_factor * torch.clamp(self._ema_min, min=self.divergence_floor)

    def _poll_lagged(self, trainer: Trainer, pl_module: LightningModule, flag: torch.Tensor) -> None:
        """Copy this step's flag to the host without waiting; read the copy made ``lag_steps`` steps ago."""
        cuda = flag.device.type == "cuda"
        slots = self.lag_steps + 1
        if not self._ring:
            self._ring = [(torch.zeros((), dtype=torch.uint8, pin_memory=cuda), torch.cuda.Event() if cuda else None, 0)
                          for _ in range(slots)]
        slot = self._steps % slots
        host, event, _ = self._ring[slot]
        host.copy_(flag, non_blocking=cuda)
        if event is not None:
            event.record()
        self._ring[slot] = (host, event, self._steps)
        if self._steps <= self.lag_steps:
            return
        old_host, old_event, old_step = self._ring[(self._steps - self.lag_steps) % slots]
        if old_event is not None:
            old_event.synchronize()  # waits for that copy only: the device finished it lag_steps steps ago
        if int(old_host):
            self._stop(trainer, pl_module, int(old_host), old_step)

    # --------------------------------------------------------------------------------------------- synchronous checks
    def _check_now(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or self._flag is None:
            return
        value = self._flag | self._params_bad(pl_module).to(torch.uint8) * 2
        if is_distributed():
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        if int(value):
            self._stop(trainer, pl_module, int(value), self._steps)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # before the file is written: NaN weights never reach a checkpoint. Within fit, not only while training: a
        # checkpoint callback that validates less (or more) often than every epoch saves while validating
        if trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING:
            self._check_now(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_now(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_now(trainer, pl_module)

    # --------------------------------------------------------------------------------------------- the report
    def _stop(self, trainer: Trainer, pl_module: LightningModule, value: int, step: int) -> None:
        if value == 4:  # diverged, still finite
            ema, low = float(self._ema), float(torch.clamp(self._ema_min, min=self.divergence_floor))
            raise DivergedTrainingError(
                f"training stopped: the smoothed training loss {ema:.4g} exceeded divergence_factor "
                f"{self.divergence_factor:g} x its running minimum {low:.4g} at or before global step "
                f"{trainer.global_step} (epoch {trainer.current_epoch}; guard step {step}): the run has diverged. "
                f"Likely cause: {likely_cause(trainer, self.remedy)}. {last_good_checkpoint(trainer)}"
            )
        what = " and ".join(w for bit, w in ((1, "the training loss"), (2, "a parameter or buffer")) if value & bit)
        bad = [n for n, t in self._state(pl_module) if not torch.isfinite(t).all()]
        now = f" (non-finite now: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else ""
        raise NonFiniteTrainingError(
            f"training stopped: {what} became NaN or inf at or before global step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}; guard step {step}){now}. Likely cause: {likely_cause(trainer, self.remedy)}. "
            f"{last_good_checkpoint(trainer)}"
        )


def likely_cause(trainer: Trainer, remedy: str = NonFiniteGuard.remedy) -> str:
    """A sentence naming the settings that most often make a run diverge, with their values in this run, ending with
    ``remedy`` (the options of the command that runs it)."""
    parts = []
    for opt in trainer.optimizers:
        inner = getattr(opt, "optimizer", opt)
        group = inner.param_groups[0] if inner.param_groups else {}
        values = ", ".join(f"{k}={group[k]:g}" for k in SUSPECTS if isinstance(group.get(k), (int, float)))
        parts.append(f"{type(inner).__name__}({values})")
    text = f"the optimizer settings {'; '.join(parts)}" if parts else "the optimizer settings"
    text += " - most often a learning rate that is too high"
    if any("KOALA" in p for p in parts):
        text += ", or KOALA's sigma / q (initial covariance and process noise) far from their defaults"
    if str(trainer.precision).startswith("16"):
        text += "; or fp16 overflow (precision 16-mixed: use bf16-mixed or 32-true)"
    return f"{text}. {remedy}"


def last_good_checkpoint(trainer: Trainer) -> str:
    """Where the last checkpoint written before the fault is (it was not overwritten), or that there is none."""
    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if path and Path(path).is_file():
            return (f"The last good checkpoint {path} was written before the fault and left intact; resume from it "
                    f"with --ckpt_path {path} after fixing the setting.")
    return "No checkpoint had been written yet; start the run again after fixing the setting."
