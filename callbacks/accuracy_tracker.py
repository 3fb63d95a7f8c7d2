"""Test accuracy tracked during training, reported at the last epoch and at the best validation epoch.

Learning-with-noisy-labels papers (the official Early Cutting code among them, arXiv 2502.08227) often report the best
test accuracy over all epochs, which selects the model on the test set. This callback evaluates the test set after
every training epoch and logs three numbers side by side:

- ``tracked_test/acc_last``: test accuracy of the final weights;
- ``tracked_test/acc_at_best_val``: test accuracy at the epoch with the best monitored validation metric (here the
  *noisy* validation accuracy, a legitimate model selection);
- ``tracked_test/acc_max``: the optimistic best-over-epochs number, for comparison with papers only.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_methods.callbacks.prediction_history import limited, prepare_images
from lightning_methods.datamodules.base import IndexedTensorDataset, collate_dict
from lightning_methods.utils.distributed import gather_by_index, sharded_loader


class TestAccuracyTracker(Callback):
    """Evaluate the test set after every training epoch (see the module docstring).

    Args:
        monitor: validation metric that selects the epoch (default ``val/acc``).
        mode: ``"max"`` or ``"min"``: direction of the monitor; ties keep the earlier epoch.
        every_n_epochs: evaluate every n epochs (and always at the last epoch and at a new best validation epoch).
        batch_size: batch size of the test pass (default: the DataModule's ``eval_batch_size``).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, monitor: str = "val/acc", mode: str = "max", every_n_epochs: int = 1,
                 batch_size: int | None = None) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode, self.every_n_epochs, self.batch_size = monitor, mode, every_n_epochs, batch_size
        self.history: list[dict[str, float]] = []  # per evaluated epoch: epoch, test_acc, monitor
        self.best_monitor: float | None = None
        self.best_epoch: int | None = None
        self.acc_at_best: float | None = None
        self.last_acc: float | None = None
        self._val_epoch = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Top-1 accuracy (a fraction, like ``val/acc``) of ``pl_module(images)`` on the DataModule's ``test_set``;
        identical on all ranks."""
        dm = trainer.datamodule
        ds = getattr(dm, "test_set", None)
        if not isinstance(ds, IndexedTensorDataset):
            raise RuntimeError("TestAccuracyTracker needs an ImageDataModule with a test_set (call setup)")
        loader = sharded_loader(ds, self.batch_size or getattr(dm, "eval_batch_size", 256), collate_fn=collate_dict,
                                rank=trainer.global_rank, world_size=trainer.world_size)
        was_training = pl_module.training
        pl_module.eval()
        idx, hit = [], []
        try:
            for batch in limited(loader, trainer):
                batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                image = prepare_images(batch, dm, augment=False)
                with trainer.strategy.precision_plugin.forward_context():
                    pred = pl_module(image).argmax(-1)
                idx.append(batch["index"])
                hit.append((pred == batch["target"]).float())
        finally:
            pl_module.train(was_training)
        _, hits = gather_by_index(torch.cat(idx), torch.cat(hit))
        return hits.mean().item()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        value = trainer.callback_metrics.get(self.monitor) if self._val_epoch == epoch else None
        value = None if value is None else float(value)
        best = self.best_monitor
        improved = value is not None and (best is None or (value > best if self.mode == "max" else value < best))
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps  # -1 (or None): no limit
        last = (trainer.should_stop or (max_epochs not in (None, -1) and epoch + 1 >= max_epochs)
                or (max_steps not in (None, -1) and trainer.global_step >= max_steps))
        if not (improved or last or (epoch + 1) % self.every_n_epochs == 0):
            return
        acc = self.evaluate(trainer, pl_module)
        self.last_acc = acc
        if improved:
            self.best_monitor, self.best_epoch, self.acc_at_best = value, epoch, acc
        self.history.append({"epoch": float(epoch), "test_acc": acc, "monitor": value if value is not None else -1.0})
        metrics = {"acc": acc, "acc_max": self.acc_max}
        if self.acc_at_best is not None:
            metrics.update(acc_at_best_val=self.acc_at_best, best_val_epoch=float(self.best_epoch))
        for key, val in metrics.items():
            pl_module.log(f"tracked_test/{key}", val, on_epoch=True, batch_size=1, sync_dist=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({f"tracked_test/{k}": v for k, v in self.summary().items() if v is not None},
                               step=trainer.global_step)

    @property
    def acc_max(self) -> float:
        return max((h["test_acc"] for h in self.history), default=float("nan"))

    def summary(self) -> dict[str, float | None]:
        """``acc_last``, ``acc_at_best_val``, ``best_val_epoch``, ``best_val``, ``acc_max`` (fractions)."""
        return {"acc_last": self.last_acc, "acc_at_best_val": self.acc_at_best,
                "best_val_epoch": None if self.best_epoch is None else float(self.best_epoch),
                "best_val": self.best_monitor, "acc_max": self.acc_max if self.history else None}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "best_monitor": self.best_monitor, "best_epoch": self.best_epoch,
                "acc_at_best": self.acc_at_best, "last_acc": self.last_acc}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, key, value)
