"""EMQ's bit-wise coreset sampling: every bit-width (child model) scores the data and trains on its own subset.

Kim, An, Jeon, Ko. *Efficient Multi-bit Quantization Network Training via Weight Bias Correction and Bit-wise Coreset
Sampling*. NeurIPS 2025, arXiv 2510.20673. The concept is the paper's; the recipe (EL2N by default, top scores, refresh
schedule, warm-up, batch layout) is our choice, see ``lightning_methods.quantization.coreset`` and
docs/methods/quantization.md.

How it plugs into Lightning (works with ``MultiBitClassifier`` and any DataModule whose training set is indexable):

- At ``setup`` the callback wraps the DataModule's ``train_dataloader``; Lightning calls it at every epoch start
  (``reload_dataloaders_every_n_epochs: 1`` is required, and checked). During the ``warmup_full`` first epochs it
  returns the DataModule's own loader: every bit-width trains on the same full-data batch (Any-Precision's cost).
  Afterwards it returns a loader whose every batch is ``[batch of S_32 | batch of S_8 | ...]`` (one chunk per
  trained bit-width, high to low) and tells the module (``bitwise_batches``) to split it: one training step holds
  one batch per child and ends with ONE optimizer step, and an epoch has ``ceil((1 - p) N / (B W))`` steps, so every
  child visits every sample of its subset once per epoch (the last step is partial: the DataModule's ``drop_last``
  does not apply).
- On refresh epochs (``warmup_full``, then every ``refresh_every`` epochs) every child scores the whole training
  set in eval mode without augmentation (``train_set``, normalized only). Under DDP each rank scores its shard and
  the scores are gathered by position (``gather_by_index``: no padding duplicates), so every rank chooses the same
  subsets; the per-rank order comes from ``(seed, epoch)`` and is a shard of one global order
  (``bitwise_epoch_order``); its sampler is a ``DistributedSampler``, which Lightning does not wrap again.
- The children score with the BatchNorm running statistics that training left (the spec's eval mode; with a shared
  BN every child's mixed), or, with ``score_bn="recalibrated"``, each with its own statistics re-estimated first on
  un-augmented training batches (the same on every rank; the training statistics are put back afterwards).
- Scores, subsets and the last refresh epoch are in the checkpoint: resuming does not re-score a finished refresh
  and reads the same batches as the uninterrupted run. Scoring time and samples go into the module's cost log.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_methods.layers.quantized import set_bits
from lightning_methods.quantization.bn import batchnorms, bn_stats, load_bn_stats, recalibrate_bn
from lightning_methods.quantization.convert import classifier_layer
from lightning_methods.quantization.coreset import (
    bitwise_epoch_order,
    check_prune_rate,
    coreset_size,
    el2n_scores,
    grand_last_layer_scores,
    refresh_due,
    select_coreset,
    union_fraction,
)
from lightning_methods.quantization.data import calibration_batches, plain_images, scoring_loader, train_dataset
from lightning_methods.quantization.sampler import bitwise_loader
from lightning_methods.utils import gather_by_index, seeded_generator

Score = Literal["el2n", "grand", "random"]
ScoreBN = Literal["running", "recalibrated"]


class BitwiseCoresetCallback(Callback):
    """Per-bit coresets for ``MultiBitClassifier`` (EMQ).

    Args:
        prune_rate: fraction p of the training set each bit-width skips per epoch, in [0, 1) (0.8 and 0.6 in the
            paper); every subset has ``round((1 - p) N)`` samples.
        refresh_every: epochs between two refreshes of the scores and subsets (10; not fixed by the paper).
        warmup_full: epochs on the full data before the first refresh (1, our choice).
        score: ``"el2n"`` (default), ``"grand"`` (last-layer gradient norm) or ``"random"`` (no scoring pass).
        score_ema: if set, the scores are averaged across refreshes: ``s = a s_old + (1 - a) s_new``.
        stratified: per-class quotas proportional to the class sizes.
        random_fraction: fraction of each subset drawn at random from the samples not chosen by score.
        score_batch_size: batch size of the scoring pass (default: the training batch size).
        score_bn: the BatchNorm statistics each child scores with: ``"running"`` (default, the spec: the running
            statistics training left; with a shared BN they mix every child's, and a child far from that mix, such
            as the unclamped 32-bit one, scores with an accuracy far below its own) or ``"recalibrated"`` (each
            child's statistics re-estimated first, as its evaluation does with ``bn_recalibration``; our option).
        score_recalib_batches: calibration batches per child for ``score_bn="recalibrated"`` (1 under
            fast_dev_run); their forward passes are counted as scoring cost.
        seed: seed of the per-epoch order and of random draws.

    Raises:
        ValueError: for a prune rate outside [0, 1), ``refresh_every < 1``, ``warmup_full < 0``, an unknown score,
            ``score_ema`` outside [0, 1), an unknown ``score_bn`` or ``score_recalib_batches < 1``.
    """

    def __init__(self, prune_rate: float = 0.8, refresh_every: int = 10, warmup_full: int = 1, score: Score = "el2n",
                 score_ema: float | None = None, stratified: bool = False, random_fraction: float = 0.0,
                 score_batch_size: int | None = None, score_bn: ScoreBN = "running", score_recalib_batches: int = 50,
                 seed: int = 0) -> None:
        check_prune_rate(prune_rate)
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1 epoch, got {refresh_every}")
        if warmup_full < 0:
            raise ValueError(f"warmup_full must be >= 0 epochs, got {warmup_full}")
        if score not in ("el2n", "grand", "random"):
            raise ValueError(f"score must be 'el2n', 'grand' or 'random', got {score!r}")
        if score_ema is not None and not 0.0 <= score_ema < 1.0:
            raise ValueError(f"score_ema must be in [0, 1) or null, got {score_ema}")
        if not 0.0 <= random_fraction <= 1.0:
            raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction}")
        if score_bn not in ("running", "recalibrated"):
            raise ValueError(f"score_bn must be 'running' or 'recalibrated', got {score_bn!r}")
        if score_recalib_batches < 1:
            raise ValueError(f"score_recalib_batches must be >= 1, got {score_recalib_batches}")
        self.prune_rate, self.refresh_every, self.warmup_full = prune_rate, refresh_every, warmup_full
        self.score, self.score_ema, self.stratified = score, score_ema, stratified
        self.random_fraction, self.score_batch_size, self.seed = random_fraction, score_batch_size, seed
        self.score_bn, self.score_recalib_batches = score_bn, score_recalib_batches
        self.scores: dict[int, torch.Tensor] = {}
        self.subsets: dict[int, torch.Tensor] = {}  # positions in the training set, sorted
        self.refresh_epoch = -1
        self.n = 0
        self._wrapped: tuple[Any, bool, Any] | None = None

    # ------------------------------------------------------------------------------------------ wiring
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "bitwise_batches") or not hasattr(pl_module, "train_order"):
            raise TypeError(f"BitwiseCoresetCallback needs a MultiBitClassifier, got {type(pl_module).__name__}")
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "BitwiseCoresetCallback changes the training subsets between epochs: set "
                f"trainer.reload_dataloaders_every_n_epochs: 1 (got {trainer.reload_dataloaders_every_n_epochs})")
        source = trainer.datamodule
        if source is None:
            if not is_overridden("train_dataloader", pl_module):
                raise ValueError("BitwiseCoresetCallback needs the training data from a DataModule (or the module's "
                                 "train_dataloader), not from loaders passed to Trainer.fit")
            source = pl_module
        own = "train_dataloader" in vars(source)
        original = source.train_dataloader

        def train_dataloader() -> Any:
            return self.loader_for_epoch(trainer, pl_module, original())

        source.train_dataloader = train_dataloader
        self._wrapped = (source, own, original)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            source, own, original = self._wrapped
            if own:
                source.train_dataloader = original
            else:
                del source.train_dataloader
            self._wrapped = None
            pl_module.bitwise_batches = False

    def loader_for_epoch(self, trainer: Trainer, pl_module: LightningModule, loader: Any) -> Any:
        """The training loader of the current epoch (refreshing the subsets first when due)."""
        epoch = trainer.current_epoch
        if epoch < self.warmup_full:
            pl_module.bitwise_batches = False
            return loader
        due = refresh_due(epoch, self.warmup_full, self.refresh_every)
        if (due and self.refresh_epoch != epoch) or not self.subsets:
            self.refresh(trainer, pl_module, epoch)
        n = len(loader.dataset) if hasattr(loader, "dataset") else len(loader.images)
        if n != self.n:
            raise ValueError(
                f"the training set has {n} samples but the coresets were chosen from {self.n}: resume "
                "with the data of the checkpoint, or start a new run"
            )
        subsets = [self.subsets[b] for b in pl_module.train_order]
        # every coreset sample once per epoch: the DataModule's drop_last does not apply (the last step is partial)
        order = bitwise_epoch_order(
            subsets,
            n,
            loader.batch_size,
            seed=self.seed,
            epoch=epoch,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
        )
        pl_module.bitwise_batches = True
        return bitwise_loader(loader, order, len(subsets), trainer.global_rank, trainer.world_size, epoch)

    # ------------------------------------------------------------------------------------------ scoring
    def refresh(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Score the training set with every trained bit-width and choose the subsets (same on every rank)."""
        start = time.perf_counter()
        ds = train_dataset(trainer, "BitwiseCoresetCallback")
        bits = list(pl_module.train_order)
        if self.score == "random":
            n = len(ds)
            index = getattr(ds, "indices", torch.arange(n))
            targets = getattr(ds, "targets", None)
            new = {b: torch.rand(n, generator=seeded_generator(self.seed, epoch, b)) for b in bits}
        else:
            index, targets, new = self._score_pass(trainer, pl_module, ds, bits)
            n = len(index)
        if self.score_ema is not None and self.scores and self.n == n:
            a = self.score_ema
            new = {b: a * self.scores[b] + (1 - a) * new[b] if b in self.scores else new[b] for b in bits}
        size = coreset_size(n, self.prune_rate)
        self.subsets = {
            b: select_coreset(
                new[b],
                index,
                size,
                targets=targets,
                stratified=self.stratified,
                random_fraction=self.random_fraction,
                generator=seeded_generator(self.seed, epoch, b, 1),
            )
            for b in bits
        }
        self.scores, self.n, self.refresh_epoch = new, n, epoch
        if hasattr(pl_module, "cost"):
            pl_module.cost.add_time("score", time.perf_counter() - start)

    def _score_pass(self, trainer: Trainer, pl_module: LightningModule, ds: Any, bits: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        device = pl_module.device
        batch_size = self.score_batch_size or int(getattr(trainer.datamodule, "batch_size", 128))
        features: list[torch.Tensor] = []
        head = classifier_layer(pl_module.backbone) if self.score == "grand" else None
        if self.score == "grand" and head is None:
            raise ValueError("score='grand' needs a classifier nn.Linear in the backbone")
        hook = head.register_forward_pre_hook(lambda m, a: features.append(a[0])) if head is not None else None
        was_training = pl_module.training
        previous = set_bits(pl_module.backbone, bits[0])
        base = bn_stats(pl_module.backbone) if self.score_bn == "recalibrated" else None
        pos, idx, tgt, scores = [], [], [], {b: [] for b in bits}
        try:
            bank = {} if base is None else self._recalibrated_stats(trainer, pl_module, bits, batch_size, base)
            pl_module.eval()
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for batch in scoring_loader(ds, batch_size):
                    x = plain_images(batch["image"], trainer, device)
                    y = batch["target"].to(device)
                    for b in bits:
                        set_bits(pl_module.backbone, b)
                        if b in bank:
                            load_bn_stats(pl_module.backbone, bank[b])
                        features.clear()
                        logits = pl_module(x)
                        s = (el2n_scores(logits, y) if head is None else
                             grand_last_layer_scores(logits, y, features[-1], head.bias is not None))
                        scores[b].append(s)
                        if hasattr(pl_module, "cost"):
                            pl_module.cost.add("score", b, y.shape[0])
                    pos.append(batch["position"].to(device))
                    idx.append(batch["index"].to(device))
                    tgt.append(y)
        finally:
            if hook is not None:
                hook.remove()
            if base is not None:
                load_bn_stats(pl_module.backbone, base)  # training goes on with its own statistics
            pl_module.train(was_training)
            set_bits(pl_module.backbone, previous)
        gathered = gather_by_index(torch.cat(pos), torch.cat(idx), torch.cat(tgt),
                                   *[torch.cat(scores[b]).float() for b in bits])
        position, index, targets, *per_bit = (t.cpu() for t in gathered)
        if not torch.equal(position, torch.arange(len(ds))):
            raise RuntimeError(f"coreset scoring covered {len(position)} of {len(ds)} training samples")
        return index, targets, dict(zip(bits, per_bit))

    def _recalibrated_stats(self, trainer: Trainer, pl_module: LightningModule, bits: list[int], batch_size: int,
                            base: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
        """Each child's BatchNorm statistics re-estimated on un-augmented training batches (``calibration_batches``:
        the same on every rank), starting each time from the training statistics ``base``."""
        if not batchnorms(pl_module.backbone):
            return {}
        n_batches = 1 if trainer.fast_dev_run else self.score_recalib_batches
        bank = {}
        with trainer.precision_plugin.forward_context():
            for b in bits:
                load_bn_stats(pl_module.backbone, base)
                batches = calibration_batches(trainer, n_batches, batch_size, pl_module.device, seed=self.seed)
                seen = recalibrate_bn(pl_module.backbone, b, batches, n_batches)
                bank[b] = bn_stats(pl_module.backbone)
                if hasattr(pl_module, "cost"):
                    pl_module.cost.add("score", b, seen)
        return bank

    # ------------------------------------------------------------------------------------------ logging, state
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bitwise = bool(getattr(pl_module, "bitwise_batches", False))
        values = {"coreset/active": float(bitwise)}
        if bitwise and self.subsets:
            values["coreset/subset_fraction"] = len(next(iter(self.subsets.values()))) / self.n
            values["coreset/union_fraction"] = union_fraction(list(self.subsets.values()), self.n)
            values["coreset/refreshed"] = float(self.refresh_epoch == trainer.current_epoch)
        pl_module.log_dict(values, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)  # equal on all ranks

    def state_dict(self) -> dict[str, Any]:
        return {"scores": {int(b): s for b, s in self.scores.items()},
                "subsets": {int(b): s for b, s in self.subsets.items()},
                "refresh_epoch": self.refresh_epoch, "n": self.n, "prune_rate": self.prune_rate}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scores = {int(b): s for b, s in state_dict.get("scores", {}).items()}
        self.subsets = {int(b): s for b, s in state_dict.get("subsets", {}).items()}
        self.refresh_epoch = int(state_dict.get("refresh_epoch", -1))
        self.n = int(state_dict.get("n", 0))
        if state_dict.get("prune_rate", self.prune_rate) != self.prune_rate:
            # a changed prune rate: keep the scores, re-choose the subsets at the next epoch start
            self.subsets = {}
