"""Per-bit evaluation of multi-bit networks: every evaluated bit-width gets its own accuracy / loss metric and,
optionally, its own recalibrated BatchNorm statistics (EMQ's BN adaptation, arXiv 2510.20673; Any-Precision's
untrained bit-widths, arXiv 1911.07346), while training keeps the shared statistics.

:class:`PerBitEvaluation` is a mixin of ``MultiBitClassifier`` (it overrides ``ImageClassifier._eval_step``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_methods.classifier import as_dict_batch
from lightning_methods.layers.quantized import check_bits, set_bits
from lightning_methods.quantization.bn import batchnorms, bn_stats, load_bn_stats, recalibrate_bn
from lightning_methods.quantization.data import calibration_batches
from lightning_methods.quantization.plots import write_bit_accuracy


class PerBitEvaluation:
    """Validation / test at every bit-width of ``eval_bits`` (``{stage}/acc_bit{b}``, ``{stage}/loss_bit{b}``;
    ``{stage}/acc`` and ``{stage}/loss`` are the means over the trained bit-widths among them)."""

    @property
    def eval_bits(self) -> list[int]:
        """The bit-widths evaluated in validation and test (sorted); assign a new list to evaluate others."""
        return self._eval_bits

    @eval_bits.setter
    def eval_bits(self, bits: list[int]) -> None:
        bits = sorted(set(bits))
        if not bits:
            raise ValueError("eval_bits is empty: give the bit-widths to evaluate, e.g. [1, 2, 3, 4, 5, 6, 7, 8, 32]")
        check_bits(bits, "every evaluated bit-width (model.eval_bits)")
        self._eval_bits = bits
        for stage in ("val", "test"):
            for b in bits:
                if f"{stage}_{b}" not in self.bit_acc:  # metric states are not saved: any list loads any checkpoint
                    self.bit_acc[f"{stage}_{b}"] = MulticlassAccuracy(self.num_classes, average="micro",
                                                                      validate_args=False).to(self.device)
                    self.bit_loss[f"{stage}_{b}"] = MeanMetric().to(self.device)

    # ----------------------------------------------------------------------------------------------- evaluation
    def _prepare_eval_bn(self) -> None:
        """Per-bit calibrated BatchNorm statistics for this evaluation (training keeps the shared statistics)."""
        self._bn_bank = {}
        if self.bn_recalibration == "none" or not batchnorms(self.backbone):
            return
        todo = [b for b in self.eval_bits if self.bn_recalibration == "all" or b not in self.bits]
        if not todo:
            return
        trainer = self.trainer
        n_batches = 1 if trainer.fast_dev_run or trainer.sanity_checking else self.recalib_batches
        batch_size = int(getattr(trainer.datamodule, "batch_size", 128))
        self._bn_base = bn_stats(self.backbone)
        with trainer.precision_plugin.forward_context():
            for b in todo:
                batches = calibration_batches(trainer, n_batches, batch_size, self.device)
                recalibrate_bn(self.backbone, b, batches, n_batches)
                self._bn_bank[b] = bn_stats(self.backbone)
                load_bn_stats(self.backbone, self._bn_base)

    def _eval_step(self, batch: Any, metrics: Any, stage: str) -> None:
        batch = as_dict_batch(batch)
        n = batch["target"].shape[0]
        previous = set_bits(self.backbone, self.eval_bits[0])
        for b in self.eval_bits:
            set_bits(self.backbone, b)
            if b in self._bn_bank:
                load_bn_stats(self.backbone, self._bn_bank[b])
            logits = self(batch["image"])
            if b in self._bn_bank:
                load_bn_stats(self.backbone, self._bn_base)
            self.bit_acc[f"{stage}_{b}"].update(logits, batch["target"])
            self.bit_loss[f"{stage}_{b}"].update(F.cross_entropy(logits.float(), batch["target"]), weight=n)
        set_bits(self.backbone, previous)

    def _log_eval(self, stage: str) -> dict[int, torch.Tensor]:
        accs, losses = {}, {}
        for b in self.eval_bits:
            accs[b] = self.bit_acc[f"{stage}_{b}"].compute()
            losses[b] = self.bit_loss[f"{stage}_{b}"].compute()
            self.bit_acc[f"{stage}_{b}"].reset()
            self.bit_loss[f"{stage}_{b}"].reset()
            self.log(f"{stage}/acc_bit{b}", accs[b], prog_bar=False)
            self.log(f"{stage}/loss_bit{b}", losses[b])
        trained = [b for b in self.eval_bits if b in self.bits] or self.eval_bits
        # the checkpoint monitor (val/acc) and the progress bar: the mean over the trained, evaluated bit-widths
        self.log(f"{stage}/acc", torch.stack([accs[b] for b in trained]).mean(), prog_bar=stage == "val")
        self.log(f"{stage}/loss", torch.stack([losses[b] for b in trained]).mean(), prog_bar=stage == "val")
        self._bn_bank, self._bn_base = {}, None
        return accs

    def on_test_epoch_start(self) -> None:
        self._prepare_eval_bn()

    def on_test_epoch_end(self) -> None:
        accs = self._log_eval("test")
        trainer = self._trainer
        writes_results = trainer is not None and any(type(c).__name__ == "ResultsWriter" for c in trainer.callbacks)
        if writes_results and trainer.is_global_zero:
            # a run with result files (the CLI's): bit_accuracy_test.json / .png beside results.json, and in W&B
            write_bit_accuracy(trainer, {b: float(a) for b, a in accs.items()})
