"""MultiBitClassifier: one network trained at several bit-widths (Any-Precision DNNs and EMQ).

- Any-Precision DNNs: Yu et al., arXiv 1911.07346 (official code SHI-Labs/Any-Precision-DNNs): switchable BN,
  every bit-width on the full batch, recursive soft-target supervision (each lower bit-width learns from the softmax
  of the next higher one), one optimizer step per batch.
- EMQ: Kim, An, Jeon, Ko, *Efficient Multi-bit Quantization Network Training via Weight Bias Correction and Bit-wise
  Coreset Sampling*, NeurIPS 2025, arXiv 2510.20673: weight bias correction + one shared BN, and per-bit coresets
  (``lightning_methods.callbacks.BitwiseCoresetCallback``), which hand each child its own batch inside one step.

The closure of the package's contract runs, for every trained bit-width from high to low, a forward pass at that
bit-width on its batch and ``manual_backward`` of its mean loss (one graph alive at a time; gradients accumulate),
and returns the top bit-width's per-sample loss; the optimizer steps once per batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.classifier import ImageClassifier, StepClosure, soft_cross_entropy
from lightning_methods.layers.quantized import ActQuant, Quantizer, SwitchableBatchNorm, check_bits, set_bits
from lightning_methods.parameters import frozen_bn_stats
from lightning_methods.quantization.convert import quantize_model
from lightning_methods.quantization.cost import TrainingCost
from lightning_methods.quantization.evaluation import PerBitEvaluation
from lightning_methods.utils import all_reduce_flat, is_distributed


def _fp32_or_64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


#: arguments kept out of the checkpoint's hyperparameters: LightningCLI's ``test --ckpt_path`` would otherwise replace
#: the command line's values with the training run's
EVAL_SETTINGS = ("eval_bits", "bn_recalibration", "recalib_batches")
#: untrained bit-widths evaluated by default (our choice; spec multibit_quant.md)
CALIBRATED_BITS = (3, 5, 6, 7)


class MultiBitClassifier(PerBitEvaluation, ImageClassifier):
    """Multi-bit ("any-precision") image classifier.

    Args:
        bits: the trained bit-widths (1..32, 32 = full precision), Any-Precision's [1, 2, 4, 8, 32] by default.
        eval_bits: bit-widths evaluated in validation / test (``val/acc_bit{b}``); ``None``: ``bits`` plus the
            untrained 3, 5, 6, 7.
        shared_bn: one BatchNorm per site for all bit-widths (EMQ) instead of one per trained bit-width
            (Any-Precision's switchable BN).
        wbc: weight bias correction (EMQ) in every quantized layer.
        supervision: loss of the lower bit-widths: ``"hard"`` (CE for every bit-width, EMQ's default), ``"soft"``
            (soft CE against the top bit-width's prediction), ``"recursive"`` (soft CE against the next higher
            bit-width's prediction, Any-Precision's best). The top bit-width always uses CE. Soft targets are
            detached. On per-bit coreset batches a soft target costs an extra no-grad forward of the teacher
            bit-width on the student's batch (counted as ``teacher`` in the cost).
        act_quant: input-activation quantization of the quantized layers (see ``quantize_model``).
        keep_first / keep_last / float_layers / float_weight_layers / plain_bn_layers: which layers stay in float
            (see ``quantize_model``; defaults: stem, classifier, 1x1 shortcuts with float weights and plain BN).
        wbc_eps: epsilon of WBC's standard-deviation ratio.
        wbc_max_ratio: optional clamp of WBC's ratio.
        clamp_full_precision: clamp the quantized layers' inputs to [0, 1] at 32 bits too (Any-Precision's paper;
            their code and the default keep ReLU at 32 bits), so the full-precision child's activation range equals
            the quantized children's.
        quantizer: ``"dorefa"`` (Any-Precision's quantizers, the papers' setting) or ``"lsq"`` (learned step sizes,
            one per trained bit-width and layer, as in MultiQuant; see ``quantize_model``). LSQ's step sizes are
            Parameters (role ``"bias"``: scalars), set from the weights and the first batch at each bit-width.
        bn_recalibration: before each validation / test, re-estimate BatchNorm statistics for ``"untrained"``
            evaluated bit-widths, for ``"all"`` of them, or ``"none"``; each evaluated bit-width then uses its own
            statistics, and training keeps the shared ones. ``None``: ``"all"`` with a shared BN (its running
            statistics mix every child's, dominated by the last trained, lowest bit-width; EMQ's "BN adaptation"),
            ``"untrained"`` with switchable BN.
        recalib_batches: calibration batches per bit-width (un-augmented training images; 1 under fast_dev_run and
            in the sanity check).
        backbone: a float backbone name or module, converted with ``quantize_model``.
        **kwargs: the remaining ``ImageClassifier`` arguments (num_classes, optimizer, lr_scheduler, ...).

    ``eval_bits``, ``bn_recalibration`` and ``recalib_batches`` are evaluation settings, not saved with the
    checkpoint's hyperparameters: ``lightning-methods test --ckpt_path CKPT --model.init_args.eval_bits [...]`` and
    ``load_from_checkpoint(path, eval_bits=[...])`` take them from the caller (defaults otherwise).
    ``predict`` runs at the current bit-width: the highest trained one, or the one chosen with
    ``lightning_methods.layers.set_bits(model.backbone, b)``.

    Raises:
        ValueError: for a bit-width outside 1..32, an empty ``bits`` or ``eval_bits``, an unknown option, or a
            backbone with no layer to quantize.
    """

    def __init__(
        self,
        bits: list[int] | None = None,
        eval_bits: list[int] | None = None,
        shared_bn: bool = True,
        wbc: bool = True,
        supervision: Literal["hard", "soft", "recursive"] = "hard",
        act_quant: ActQuant = "unsigned",
        keep_first: bool = True,
        keep_last: bool = True,
        float_layers: list[str] | None = None,
        float_weight_layers: list[str] | None = None,
        plain_bn_layers: list[str] | None = None,
        wbc_eps: float = 1e-8,
        wbc_max_ratio: float | None = None,
        clamp_full_precision: bool = False,
        quantizer: Quantizer = "dorefa",
        bn_recalibration: Literal["none", "untrained", "all"] | None = None,
        recalib_batches: int = 50,
        backbone: str | nn.Module = "resnet20x5",
        **kwargs: Any,
    ) -> None:
        bits = [1, 2, 4, 8, 32] if bits is None else list(bits)
        if not bits:
            raise ValueError("bits is empty: give the trained bit-widths, e.g. [1, 2, 4, 8, 32]")
        check_bits(bits, "every trained bit-width (model.bits)")
        if eval_bits is not None and len(eval_bits) == 0:
            raise ValueError("eval_bits is empty: give the bit-widths to evaluate, e.g. [1, 2, 3, 4, 5, 6, 7, 8, 32], "
                             "or null for the trained ones plus 3, 5, 6, 7")
        eval_bits = sorted(set(bits) | set(CALIBRATED_BITS)) if eval_bits is None else eval_bits
        if supervision not in ("hard", "soft", "recursive"):
            raise ValueError(f"supervision must be 'hard', 'soft' or 'recursive', got {supervision!r}")
        if bn_recalibration is None:
            bn_recalibration = "all" if shared_bn else "untrained"
        if bn_recalibration not in ("none", "untrained", "all"):
            raise ValueError(f"bn_recalibration must be 'none', 'untrained' or 'all', got {bn_recalibration!r}")
        if recalib_batches < 1:
            raise ValueError(f"recalib_batches must be >= 1, got {recalib_batches}")
        super().__init__(backbone=backbone, **kwargs)
        for key in EVAL_SETTINGS:  # evaluation settings: `test --ckpt_path CKPT --model.init_args.eval_bits ...` wins
            self._hparams.pop(key, None)
            self._hparams_initial.pop(key, None)
        quantize_model(self.backbone, bits, shared_bn=shared_bn, wbc=wbc, act_quant=act_quant, keep_first=keep_first,
                       keep_last=keep_last, float_layers=float_layers or (), float_weight_layers=float_weight_layers,
                       plain_bn_layers=plain_bn_layers, wbc_eps=wbc_eps, wbc_max_ratio=wbc_max_ratio,
                       clamp_full_precision=clamp_full_precision, quantizer=quantizer)
        self.bits = sorted(set(bits))
        self.train_order = sorted(self.bits, reverse=True)  # high -> low, the layout of per-bit batches
        self.bit_acc, self.bit_loss = nn.ModuleDict(), nn.ModuleDict()
        self.eval_bits = eval_bits  # validated by the property setter
        self.supervision, self.bn_recalibration, self.recalib_batches = supervision, bn_recalibration, recalib_batches
        self.bitwise_batches = False  # set by BitwiseCoresetCallback: the batch holds one chunk per trained bit
        self.cost = TrainingCost(self.bits)
        self._cost_open = False
        self._bn_bank: dict[int, list[torch.Tensor]] = {}
        self._bn_base: list[torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------------- training
    def per_sample_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """CE of every sample in fp32 (float64 stays float64, so float64 runs match the official code exactly)."""
        if logits.dtype != torch.float64:
            return super().per_sample_loss(logits, batch)
        if "soft_target" in batch:
            return soft_cross_entropy(logits, batch["soft_target"].double(), self.label_smoothing)
        return F.cross_entropy(logits, batch["target"], reduction="none", label_smoothing=self.label_smoothing)

    def chunks(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The batch of every trained bit-width (``train_order``): slices of a per-bit batch, else the same batch."""
        if not self.bitwise_batches:
            return [batch] * len(self.train_order)
        k, n = len(self.train_order), batch["target"].shape[0]
        if n % k:
            raise RuntimeError(f"a per-bit batch of {n} samples cannot be split into {k} equal chunks")
        m = n // k
        return [{key: v[i * m : (i + 1) * m] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v
                 for key, v in batch.items()} for i in range(k)]

    def _soft_target(self, logits_by_chunk: dict[int, tuple[Any, torch.Tensor]], chunk: dict, teacher_bits: int
                     ) -> torch.Tensor:
        ref, logits = logits_by_chunk[teacher_bits]
        if ref is not chunk:  # another child's batch: one extra no-grad forward of the teacher on this batch
            set_bits(self.backbone, teacher_bits)
            with torch.no_grad(), frozen_bn_stats(self):
                logits = self(chunk["image"])
            self.cost.add("teacher", teacher_bits, chunk["target"].shape[0])
        return torch.softmax(_fp32_or_64(logits.detach()), dim=-1)

    def multibit_backward(self, chunks: list[dict[str, torch.Tensor]], count: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Forward + ``manual_backward`` of every trained bit-width, high to low; gradients accumulate.

        Returns the top bit-width's per-sample loss and logits and the mean loss of every bit-width (detached).
        """
        seen: dict[int, tuple[Any, torch.Tensor]] = {}
        top_losses = top_logits = None
        means = {}
        for i, (bits, chunk) in enumerate(zip(self.train_order, chunks)):
            set_bits(self.backbone, bits)
            logits = self(chunk["image"])
            if i == 0 or self.supervision == "hard":
                losses = self.per_sample_loss(logits, chunk)
            else:
                teacher = self.train_order[i - 1] if self.supervision == "recursive" else self.train_order[0]
                losses = soft_cross_entropy(_fp32_or_64(logits), self._soft_target(seen, chunk, teacher))
            seen[bits] = (chunk, logits.detach())
            self.manual_backward(losses.mean())
            means[bits] = losses.detach().mean()
            if count:
                self.cost.add("train", bits, chunk["target"].shape[0])
            if i == 0:
                top_losses, top_logits = losses.detach(), logits.detach()
        set_bits(self.backbone, self.train_order[0])
        return top_losses, top_logits, means  # type: ignore[return-value]

    def make_closure(self, batch: dict[str, torch.Tensor], optimizer: Any) -> StepClosure:
        chunks = self.chunks(batch)

        def run(closure: StepClosure, call: int) -> torch.Tensor:
            self.closure_call = call
            optimizer.zero_grad(set_to_none=True)
            with self.closure_call_context(optimizer, call):
                losses, logits, means = self.multibit_backward(chunks, count=call == 0)
            if call == 0:
                closure.first_loss = losses.mean()
                closure.bit_losses = means
                self.train_metrics.update(logits, chunks[0]["target"])
            return losses

        closure = StepClosure(run)
        closure.bit_losses, closure.first_batch = {}, chunks[0]
        return closure

    def log_training_step(self, batch: Mapping[str, torch.Tensor], closure: Any) -> None:
        super().log_training_step(closure.first_batch, closure)  # one child's chunk: its size is the batch size
        n = closure.first_batch["target"].shape[0]
        for bits, loss in closure.bit_losses.items():
            self.log(f"train/loss_bit{bits}", loss, on_step=False, on_epoch=True, batch_size=n)

    # ----------------------------------------------------------------------------------------------- cost
    def on_train_epoch_start(self) -> None:
        self.cost.start()
        self._cost_open = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._close_cost_epoch()  # before validation, so a checkpoint written there holds this epoch's cost

    def on_train_epoch_end(self) -> None:
        self._close_cost_epoch()
        super().on_train_epoch_end()

    def _close_cost_epoch(self) -> None:
        if not self._cost_open:
            return
        self._cost_open = False
        self.cost.pause(self.device)
        metrics = self.cost.end_epoch(self.current_epoch, all_reduce_flat if is_distributed() else None)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)  # times: rank mean
        path = self.cost_file()
        if path is not None and self.trainer.is_global_zero and not self.trainer.fast_dev_run:
            self.cost.write_json(path)

    def cost_file(self) -> Path | None:
        """``multibit_cost.json`` next to the run's checkpoints; ``None`` (no file) when nothing is checkpointed."""
        ckpt = self.trainer.checkpoint_callback  # (not trainer.log_dir: it broadcasts, a collective on rank 0 only)
        folder = getattr(ckpt, "dirpath", None)
        return Path(folder) / "multibit_cost.json" if folder else None

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.cost.pause(self.device)  # validation is not training cost
        self._prepare_eval_bn()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["multibit_cost"] = self.cost.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "multibit_cost" in checkpoint:
            self.cost.load_state_dict(checkpoint["multibit_cost"])

    def on_fit_start(self) -> None:
        super().on_fit_start()
        strategy = self.trainer.strategy
        per_bit = []
        if any(isinstance(m, SwitchableBatchNorm) for m in self.backbone.modules()):
            per_bit.append("switchable BatchNorm (shared_bn: false) leaves the other bit-widths' BatchNorms")
        if any(getattr(m, "quantizer", None) == "lsq" for m in self.backbone.modules()):
            per_bit.append("LSQ (quantizer: lsq) leaves the other bit-widths' step sizes")
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if per_bit and ddp_kwargs is not None and self.trainer.world_size > 1 and not ddp_kwargs.get(
                "find_unused_parameters", False):
            raise ValueError(
                f"{' and '.join(per_bit)} unused in each backward pass, which DDP refuses without "
                "find_unused_parameters: use --trainer.strategy ddp_find_unused_parameters_true")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking and self._cost_open:
            self.cost.start()  # validation in the middle of an epoch
