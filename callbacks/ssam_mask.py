""":class:`SSAMMaskCallback` refreshes the masks of Sparse SAM every ``update_freq`` epochs (and, as a
:class:`~lightning_methods.callbacks.SAMEpochSync`, tells the optimizer the epoch), following the official code of
Mi et al., *Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach*, NeurIPS 2022,
arXiv 2210.05177:

  - ``mode="fisher"`` (SSAM-F): at batch 0 of every ``update_freq``-th epoch, after that step, score every perturbed
    entry by the empirical Fisher over ``num_samples`` random training samples (batch size 1, training transforms,
    cross-entropy against the true labels, model in train mode, BatchNorm statistics untouched) and keep the global
    top ``int(d (1 - s))``. Samples are split over the ranks and the scores summed, so every rank gets the same mask.
  - ``mode="dynamic"`` (SSAM-D): at batch 0 of every ``update_freq``-th epoch, drop/grow inside that step after the
    ascent (scores from the gradients at ``w``) with the cosine death rate ``dr(epoch)``; the new mask acts from the
    next step. Random scores are seeded by ``(seed, epoch)``: identical on every rank.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import default_collate

from lightning_methods.callbacks.sam_epoch_sync import SAMEpochSync, sam_optimizers
from lightning_methods.classifier import as_dict_batch
from lightning_methods.optim.sam_masks import death_rate
from lightning_methods.optim.sam_sparse import SSAM
from lightning_methods.utils.seeding import mix_seed, seeded_generator


class SSAMMaskCallback(SAMEpochSync):
    """Mask updates of SSAM-F (``mode="fisher"``) and SSAM-D (``mode="dynamic"``).

    Args:
        mode: ``"fisher"`` or ``"dynamic"``.
        update_freq: update at batch 0 of every epoch with ``epoch % update_freq == 0`` (epoch 0 included).
        num_samples: Fisher: number of single training samples ``N_F`` (official examples 16-128, cfg 1024).
        drop_rate: dynamic: death rate at ``T_start = 0``.
        drop_score: dynamic: score of live entries, ``"gradient"`` (|g|, default), ``"weight"`` (|w|) or ``"random"``.
        grow_score: dynamic: score of dead entries, ``"random"`` (default), ``"gradient"`` or ``"weight"``.
        t_end: dynamic: epoch where the death rate reaches 0 (default ``trainer.max_epochs``, as officially).
        seed: seed of the Fisher sample draws and of the random scores (combined with the epoch).
    """

    def __init__(
        self,
        mode: Literal["fisher", "dynamic"] = "fisher",
        update_freq: int = 1,
        num_samples: int = 128,
        drop_rate: float = 0.5,
        drop_score: Literal["gradient", "weight", "random"] = "gradient",
        grow_score: Literal["gradient", "weight", "random"] = "random",
        t_end: int | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in ("fisher", "dynamic"):
            raise ValueError(f"mode must be 'fisher' (SSAM-F) or 'dynamic' (SSAM-D), got {mode!r}")
        if update_freq < 1 or num_samples < 1:
            raise ValueError(f"update_freq and num_samples must be >= 1, got {update_freq}, {num_samples}")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
        self.mode, self.update_freq, self.num_samples = mode, update_freq, num_samples
        self.drop_rate, self.drop_score, self.grow_score = drop_rate, drop_score, grow_score
        self.t_end, self.seed = t_end, seed
        self.updates = 0
        self.last_update_epoch = -1
        self._logged_epoch = -1

    # ------------------------------------------------------------------------------------------- helpers
    def optimizer(self, trainer: Trainer) -> SSAM:
        found = [o for o in sam_optimizers(trainer) if isinstance(o, SSAM)]
        if len(found) != 1:
            raise ValueError(
                f"SSAMMaskCallback needs exactly one lightning_methods.optim.SSAM optimizer, found {len(found)}; set "
                "model.init_args.optimizer.class_path: lightning_methods.optim.SSAM"
            )
        return found[0]

    def _due(self, trainer: Trainer, batch_idx: int) -> bool:
        return batch_idx == 0 and trainer.current_epoch % self.update_freq == 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        opt = self.optimizer(trainer)
        if self.mode == "dynamic" and opt.mask_init == "zeros":
            raise ValueError("SSAM-D (mode='dynamic') starts from a random mask: set the optimizer's "
                             "mask_init='random' (drop/grow from an all-zero mask would perturb almost nothing)")
        if self.mode == "dynamic" and (self.t_end or trainer.max_epochs or 0) <= 0:
            raise ValueError("mode='dynamic' needs t_end (or trainer.max_epochs) for the death-rate schedule")

    # ------------------------------------------------------------------------------------------- SSAM-D
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.mode != "dynamic" or not self._due(trainer, batch_idx):
            return
        epoch = trainer.current_epoch
        rate = death_rate(epoch, self.drop_rate, self.t_end or trainer.max_epochs)
        self.optimizer(trainer).schedule_dynamic_update(rate, self.drop_score, self.grow_score,
                                                        seed=mix_seed(self.seed, epoch))
        self.updates += 1
        self.last_update_epoch = epoch

    # ------------------------------------------------------------------------------------------- SSAM-F
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        epoch = trainer.current_epoch
        if self.mode == "fisher" and self._due(trainer, batch_idx):
            self.update_fisher_mask(trainer, pl_module)
            self.updates += 1
            self.last_update_epoch = epoch
        if self.last_update_epoch == epoch and self._logged_epoch != epoch:
            self._logged_epoch = epoch
            pl_module.log("ssam/mask_density", self.optimizer(trainer).mask_density(), on_step=True, on_epoch=False,
                          batch_size=1)

    def fisher_samples(self, trainer: Trainer, pl_module: LightningModule):
        """This rank's share of the ``num_samples`` Fisher samples, one per batch, with the training transforms.

        With ``sync_batchnorm`` every rank must run the same number of forwards: use a ``num_samples`` divisible by
        the world size.
        """
        dm = trainer.datamodule
        dataset = getattr(dm, "train_set", None) if dm is not None else None
        if dataset is None:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
        if dataset is None:
            raise RuntimeError("SSAM-F needs the training dataset: use a DataModule with `train_set` or a DataLoader")
        epoch = trainer.current_epoch
        gen = seeded_generator(self.seed, epoch)
        idx = torch.randperm(len(dataset), generator=gen)[: self.num_samples]
        for i in idx[trainer.global_rank :: trainer.world_size].tolist():
            # a worker-side transform (e.g. AutoAugment) draws from the global CPU RNG: seed it by (seed, epoch,
            # sample) and restore it, so a resumed run draws the same augmentation and training's RNG is untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.seed, epoch, i))
                item = dataset[i]
            batch = pl_module._apply_batch_transfer_handler(default_collate([item]))
            batch = as_dict_batch(batch)
            yield batch["image"], batch["target"]

    def update_fisher_mask(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fisher scores over this rank's samples, summed over ranks, then the global top-k mask."""
        with trainer.precision_plugin.forward_context():
            self.optimizer(trainer).update_fisher_mask(pl_module, self.fisher_samples(trainer, pl_module))

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "last_update_epoch": self.last_update_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))
        self.last_update_epoch = int(state_dict.get("last_update_epoch", -1))
