"""The multi-round Early Cutting procedure: selection rounds, the cut, the final training; resumable.

Yuan, Feng, Han, Liu, "Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy Examples" (NeurIPS
2025, arXiv 2502.08227). Round ``r < rounds`` trains fresh modules on the previous selection with a
:class:`PredictionHistoryCallback` until the learning-time selection reaches ``keep_rate`` of the round's training
set; after round 0 the selection is recalibrated with the best noisy-validation checkpoint (the cut). The final round
trains on the final selection for all epochs. Each round is one ``Trainer.fit`` with modules instantiated afresh from
the config; its outputs go to ``run_dir/round<r>/`` (checkpoints, ``selected.npy``, ``removed.npy``, ``fkl.npy``,
``stats.json``) and to the round's W&B run (group = the run name). ``run_dir/state.json`` records finished rounds:
a finished round is never recomputed, an interrupted one resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_methods.callbacks.accuracy_tracker import TestAccuracyTracker
from lightning_methods.callbacks.checkpoint import LatestCheckpoint
from lightning_methods.callbacks.prediction_history import PredictionHistoryCallback
from lightning_methods.checkpoint_io import read_checkpoint
from lightning_methods.noisy_labels.config import SelectionConfig
from lightning_methods.noisy_labels.cut import compute_early_cut
from lightning_methods.noisy_labels.selection import CutResult
from lightning_methods.results.multistage import command_source
from lightning_methods.runs import StagedRun, config_fingerprint
from lightning_methods.utils.distributed import broadcast_object, get_rank
from lightning_methods.utils.quiet import quiet_wandb
from lightning_methods.utils.wandb import finish_runs, log_config, plain

#: data settings that do not change results, besides the generic ones of ``lightning_methods.runs.NEUTRAL_KEYS``
NEUTRAL_DATA_KEYS = {"eval_batch_size"}


class EarlyCuttingRunner:
    """Runs the procedure described in the module docstring from a parsed ``lightning-methods-select`` config.

    Args:
        parser: the parser that produced ``config`` (instantiates fresh modules per round).
        config: the parsed config namespace (keys ``trainer``, ``model``, ``data``, ``selection``, ``run_dir``, ...).
    """

    def __init__(self, parser: Any, config: Any) -> None:
        self.parser, self.config = parser, config
        self.sel = SelectionConfig(**config.selection.as_dict())
        self.run_dir = Path(config.run_dir).expanduser()
        self.seed = int(config.seed_everything)
        self.staged: StagedRun | None = None
        self.histories: dict[int, PredictionHistoryCallback] = {}  # rounds run by this process (for inspection)
        self.cuts: dict[int, CutResult] = {}
        self._start = time.monotonic()

    # ------------------------------------------------------------------------------------------- state
    def fingerprint(self) -> dict[str, Any]:
        """Every setting that changes the results: model, data (noise included), selection, seed and the trainer
        (epochs, precision, devices, ...), without paths, worker counts and logging."""
        cfg = self.config
        from lightning_methods.runs import NEUTRAL_KEYS

        return config_fingerprint({"model": cfg.model, "data": cfg.data, "selection": cfg.selection,
                                   "trainer": cfg.trainer, "seed_everything": cfg.seed_everything},
                                  NEUTRAL_KEYS | NEUTRAL_DATA_KEYS)

    @property
    def state(self) -> dict[str, Any]:
        """``{"rounds": {r: stats}, "final": stats}`` of the finished stages (read from the run's state)."""
        stages = self.staged.state.get("stages", {}) if self.staged else {}
        return {"rounds": {k[5:]: v for k, v in stages.items() if k.startswith("round")}, "final": stages.get("final")}

    # ------------------------------------------------------------------------------------------- progress
    def _progress(self, message: str) -> None:
        """One ``[select]`` progress line on stdout (rank zero), with the time since the command started."""
        if get_rank() == 0:
            elapsed = time.monotonic() - self._start
            print(f"[select] {message} ({elapsed:.0f} s elapsed)", flush=True)

    def _stage_count(self) -> int:
        return self.sel.rounds + int(bool(self.sel.final_round))

    # ------------------------------------------------------------------------------------------- building blocks
    def _instantiate(self, tag: str, train_indices: torch.Tensor | None, callbacks: list) -> tuple[Any, Any, Trainer]:
        config = self.config.clone()
        self.staged.stage_logger_settings(config.trainer, tag)
        init = self.parser.instantiate(config)
        model, dm = init.model, init.data
        if not hasattr(dm, "set_train_subset"):
            raise TypeError(f"{type(dm).__name__} cannot train on a subset; use a noisy DataModule of this package "
                            "(NoisyCIFAR100DataModule, NoisyCIFAR10DataModule, NoisyDigitsDataModule)")
        if getattr(dm, "val_split", 0.1) <= 0:
            raise ValueError("Early Cutting selects the later state on noisy validation data: set "
                             "data.init_args.val_split > 0 (paper: 0.1)")
        if getattr(dm, "label_file", "") is None:
            dm.label_file = str(self.run_dir / "noisy_labels.pt")
        if train_indices is not None:  # round 0 keeps the DataModule's own train_subset (default: all)
            dm.set_train_subset(train_indices.tolist())
        trainer_args = dict(init.trainer)
        guard = [init.nonfinite_guard] if init.get("nonfinite_guard") is not None else []  # stops a diverged round
        trainer_args["callbacks"] = [*(trainer_args.get("callbacks") or []), *callbacks, *guard]
        trainer_args["default_root_dir"] = str(self.run_dir / tag)
        trainer_args["enable_checkpointing"] = True
        trainer = Trainer(**trainer_args)
        quiet_wandb(trainer.loggers)  # no "anonymous setting has no effect" warning
        if trainer.is_global_zero:  # the resolved config of the run, with the round it belongs to
            resolved = plain(config)
            resolved.setdefault("model", {}).setdefault("init_args", {})["num_classes"] = dm.num_classes
            log_config(trainer.loggers, {**resolved, "stage": tag})
        return model, dm, trainer

    def _checkpoint(self, tag: str) -> LatestCheckpoint:
        return LatestCheckpoint(dirpath=self.run_dir / tag / "checkpoints", filename="best-{epoch:03d}",
                               monitor="val/acc", mode="max", save_top_k=1, save_last=True,
                               save_on_train_epoch_end=True, auto_insert_metric_name=False)

    def _fit(self, model: Any, dm: Any, trainer: Trainer, ckpt: ModelCheckpoint,
             history: PredictionHistoryCallback | None, tracker: TestAccuracyTracker) -> bool:
        """Fit, resuming from ``last.ckpt``; a round already stopped by its rule is restored without training.
        Returns False when the fit was interrupted."""
        last = Path(ckpt.dirpath) / "last.ckpt"
        if last.is_file() and history is not None:
            saved = read_checkpoint(last)  # checksum verified, weights-only, finite
            if saved["callbacks"].get(history.state_key, {}).get("stop_epoch") is not None:
                rank_zero_info(f"{last}: the round had already stopped; restoring its selection")
                history.load_state_dict(saved["callbacks"][history.state_key])
                tracker.load_state_dict(saved["callbacks"].get(tracker.state_key, {}))
                ckpt.load_state_dict(saved["callbacks"].get(ckpt.state_key, {}))
                dm.setup("fit")
                return True
        trainer.fit(model, datamodule=dm, ckpt_path=str(last) if last.is_file() else None, weights_only=True)
        # a round cut short (interrupted, max_steps / max_time / limits) is not finished: it resumes next time
        complete = trainer.current_epoch >= (trainer.max_epochs or 0) or trainer.should_stop
        return not trainer.interrupted and complete

    def _noise_stats(self, dm: Any, name: str, indices: torch.Tensor) -> dict[str, float]:
        noisy, clean = getattr(dm, "noisy_targets", None), getattr(dm, "clean_targets", None)
        out = {f"{name}_size": float(len(indices))}
        if noisy is not None and clean is not None:
            wrong = float((noisy[indices] != clean[indices]).sum()) if len(indices) else 0.0
            out[f"{name}_mislabeled"] = wrong
            out[f"{name}_mislabeled_rate"] = wrong / max(len(indices), 1)
        return out

    def _save_history(self, tag: str, history: PredictionHistoryCallback) -> None:
        """``history.pt``: base indices, noisy / clean targets, first-learned epochs, per-epoch statistics and (with
        ``selection.store_predictions``) the N x epochs prediction matrix of the round."""
        self.staged.save_torch(f"{tag}/history.pt", history.state_dict())

    def _report(self, trainer: Trainer, tag: str, stats: dict[str, Any], files: dict[str, torch.Tensor]) -> None:
        """Write ``stats.json`` and the index files of one round; log them to the loggers; finish its W&B run."""
        out = self.run_dir / tag
        for name, value in files.items():
            self.staged.save_numpy(f"{tag}/{name}.npy", value.numpy())
        self.staged.write_json(f"{tag}/stats.json", stats)
        if get_rank() == 0:
            numbers = {f"selection/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
            for logger in trainer.loggers:
                logger.log_metrics(numbers, step=trainer.global_step)
                if isinstance(logger, WandbLogger):
                    import wandb

                    logger.experiment.summary.update(numbers)
                    artifact = wandb.Artifact(f"{self.run_dir.name}-{tag}-selection", type="selection")
                    for name in files:
                        artifact.add_file(str(out / f"{name}.npy"))
                    artifact.add_file(str(out / "stats.json"))
                    logger.experiment.log_artifact(artifact)
        if get_rank() == 0:
            finish_runs(trainer.loggers)

    # ------------------------------------------------------------------------------------------- rounds
    def selection_round(self, r: int, train_indices: torch.Tensor | None) -> dict[str, Any] | None:
        """Run selection round ``r``; returns its stats (``None`` if interrupted)."""
        tag, sel = f"round{r}", self.sel
        seed_everything(self.seed + r)
        history = PredictionHistoryCallback(sel.warm_up_epochs, sel.k_of(r), sel.keep_rate_of(r), sel.lag,
                                            sel.history_transform, store_predictions=sel.store_predictions,
                                            seed=self.seed + r)
        self.histories[r] = history
        tracker, ckpt = TestAccuracyTracker(), self._checkpoint(tag)
        model, dm, trainer = self._instantiate(tag, train_indices, [history, tracker, ckpt])
        n = len(train_indices) if train_indices is not None else "all"
        self._progress(f"stage {r + 1} of {self._stage_count()}: selection round {r} on {n} training samples, up to "
                       f"{trainer.max_epochs} epochs (stops when the selection reaches keep rate "
                       f"{sel.keep_rate_of(r):g})")
        if not self._fit(model, dm, trainer, ckpt=ckpt, history=history, tracker=tracker):
            return None
        n_train = len(dm.train_set)
        stats: dict[str, Any] = {"round": r, "n_train": n_train, "keep_rate": sel.keep_rate_of(r), "k": sel.k_of(r),
                                 "threshold": int(n_train * sel.keep_rate_of(r)), "stop_epoch": history.stop_epoch,
                                 **self._noise_stats(dm, "train", dm.train_set.indices)}
        stats.update({f"test_{k}": v for k, v in tracker.summary().items()})
        if history.stop_epoch is None:
            stats["status"] = "threshold_not_reached"
            then = "no further rounds" if sel.on_threshold_not_reached == "stop" else "going to the final round"
            rank_zero_warn(f"round {r} never reached its threshold ({stats['threshold']} of {n_train}) within "
                           f"{trainer.max_epochs} epochs; {then}")
            self._save_history(tag, history)
            last = max(history.recorded_epochs, default=-1) - sel.lag  # what the stop rule saw last
            self._report(trainer, tag, stats, {"fkl": history.current_selection(last)})
            return stats
        self._save_history(tag, history)
        fkl = history.selection
        files = {"fkl": fkl}
        stats.update(self._noise_stats(dm, "fkl", fkl))
        if r == 0 and sel.early_cutting:
            best = ckpt.best_model_path
            n_cut = max(1, min(int(len(fkl) / sel.cutting_rate), len(fkl))) if len(fkl) else 0
            self._progress(f"round {r}: the cut - scoring the {n_cut} earliest-learned of the {len(fkl)} selected "
                           f"samples with the best checkpoint {Path(best).name}")
            cut_start = time.monotonic()
            if get_rank() == 0:
                model.load_state_dict(read_checkpoint(best)["state_dict"])  # checksum verified, weights-only
                cut, scores = compute_early_cut(model, dm, fkl, sel, trainer.strategy.root_device)
                self.staged.save_torch(f"{tag}/cut_scores.pt", scores)
            else:
                cut = None
            cut = self.cuts[r] = broadcast_object(cut)
            self._progress(f"round {r}: the cut took {time.monotonic() - cut_start:.1f} s: {len(cut.candidates)} "
                           f"candidates, {len(cut.removed)} samples removed, {len(cut.selected)} kept")
            stats.update({"best_checkpoint": Path(best).name, **self._noise_stats(dm, "cut_subset", cut.subset),
                          **self._noise_stats(dm, "candidates", cut.candidates),
                          **self._noise_stats(dm, "removed", cut.removed)})
            files["removed"] = cut.removed
            selected = cut.selected
        else:
            selected = fkl
        files["selected"] = selected
        stats.update(self._noise_stats(dm, "selected", selected))
        stats["status"] = "done"
        self._report(trainer, tag, stats, files)
        self._progress(f"selection round {r} done: stopped at epoch {history.stop_epoch}, {len(selected)} of "
                       f"{n_train} samples selected")
        return stats

    def final_round(self, train_indices: torch.Tensor | None) -> dict[str, Any] | None:
        """Train on the final selection for all epochs; returns the final stats (``None`` if interrupted)."""
        tag = "final"
        seed_everything(self.seed + self.sel.rounds)
        tracker, ckpt = TestAccuracyTracker(), self._checkpoint(tag)
        model, dm, trainer = self._instantiate(tag, train_indices, [tracker, ckpt])
        n = f"{len(train_indices)} selected" if train_indices is not None else "all"
        self._progress(f"stage {self._stage_count()} of {self._stage_count()}: final round on {n} training samples, "
                       f"{trainer.max_epochs} epochs")
        if not self._fit(model, dm, trainer, ckpt=ckpt, history=None, tracker=tracker):
            return None
        stats = {"n_train": len(dm.train_set), **self._noise_stats(dm, "train", dm.train_set.indices),
                 **{f"test_{k}": v for k, v in tracker.summary().items()}, "status": "done"}
        self._report(trainer, tag, stats, {"train_indices": dm.train_set.indices})
        return stats

    def _link_num_classes(self) -> None:
        """Apply the ``data.num_classes -> model.init_args.num_classes`` link to the config itself, so the recorded
        config and the fingerprint hold the real number of classes (the link is otherwise applied only when the
        modules are instantiated)."""
        from jsonargparse import Namespace

        from lightning_methods.hparams import import_path

        data = self.config.data
        init_args = data.init_args.as_dict() if isinstance(data.init_args, Namespace) else dict(data.init_args)
        num_classes = getattr(import_path(data.class_path)(**init_args), "num_classes", None)
        if num_classes is not None and self.config.model.get("init_args") is not None:
            self.config.model.init_args.num_classes = int(num_classes)

    def run(self) -> dict[str, Any]:
        """Run (or resume) every round; returns the summary also written to ``run_dir/summary.json``."""
        self._link_num_classes()
        self.staged = StagedRun(self.run_dir, "early_cutting", self.fingerprint(), resume=bool(self.config.resume),
                             config_text=self.parser.dump(self.config, skip_unset=False),
                             sections={"selection": SelectionConfig})
        with self.staged:
            return self._run_rounds()

    def _run_rounds(self) -> dict[str, Any]:
        train_indices: torch.Tensor | None = None
        ended = False
        for r in range(self.sel.rounds):
            done = self.staged.record(f"round{r}")
            if done is None:
                done = self.selection_round(r, train_indices)
                if done is None:
                    rank_zero_info(f"round {r} was interrupted; run the same command again to resume it")
                    return {"status": "interrupted", "round": r}
                self.staged.mark_done(f"round{r}", done)
            else:
                self._progress(f"stage {r + 1} of {self._stage_count()}: selection round {r} finished earlier "
                               f"({done['status']}); not recomputed")
            if done["status"] != "done":
                ended = self.sel.on_threshold_not_reached == "stop"
                break
            train_indices = torch.from_numpy(np.load(self.run_dir / f"round{r}" / "selected.npy"))
            if self.config.stop_after_round is not None and r >= self.config.stop_after_round:
                rank_zero_info(f"stopping after round {r} as asked (--stop_after_round {r}); run the same command "
                               "without --stop_after_round (or with a later round) to continue")
                return {"status": "paused", "round": r}
        final = self.staged.record("final")
        if self.sel.final_round and not ended and final is None:
            final = self.final_round(train_indices)
            if final is None:
                return {"status": "interrupted", "round": "final"}
            self.staged.mark_done("final", final)
        return self._summary(final, ended)

    def _summary(self, final: dict[str, Any] | None, ended: bool) -> dict[str, Any]:
        rounds = self.state["rounds"]
        accs = [v.get("test_acc_max") for v in [*rounds.values(), final or {}] if v.get("test_acc_max") is not None]
        summary = {"status": "threshold_not_reached" if ended else "done", "rounds": rounds, "final": final,
                   "test_acc_last": (final or {}).get("test_acc_last"),
                   "test_acc_at_best_val": (final or {}).get("test_acc_at_best_val"),
                   "test_acc_max_over_all_epochs_and_rounds": max(accs) if accs else None,
                   "source": command_source(self.config, self.config.get("seed_everything"))}
        self.staged.write_json("summary.json", summary)
        rank_zero_info(f"Early Cutting finished: last-epoch test acc {summary['test_acc_last']}, at best noisy-val "
                       f"epoch {summary['test_acc_at_best_val']} (summary in {self.run_dir / 'summary.json'})")
        return summary
