"""The EncMin2L pipeline runner (``lightning-methods-ood``): embed, fit RDMs, score, calibrate, fuse, report.

Bhuyan, "Tippett-minimum Fusion of Representation-space Diffusion Models for Multi-Encoder Out-of-Distribution
Detection" (arXiv 2605.20502), with the RDM of arXiv 2504.07793. Stages (each recorded in ``run_dir/state.json`` by
:class:`lightning_methods.runs.StagedRun` only when finished; a rerun runs only what is missing and resumes an
interrupted RDM fit from its ``last.ckpt``; a run directory never mixes two configurations):

1. ``encoder/<e>`` (optional): train a package backbone on the RDM training split.
2. ``embed/<e>``: frozen encoder over every image set (predict loop), features in the embedding cache.
3. ``splits``: seeded disjoint ``rdm_train`` / ``calib_1`` / ``calib_2`` sample ids of the ID fit split.
4. ``rdm/<e>/<v>``: one RDM per encoder x normalisation variant on ``rdm_train`` (+ ``rdm/monolithic``).
5. ``score/<e>/<v>``: PF-ODE log-likelihoods of the calibration, ID test, OOD and corrupted-ID sets.
6. ``report``: gate, metrics, baselines, diagnostics; CSV / JSON / PNG in ``run_dir/report`` and W&B.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_methods.checkpoint_io import recorded_hashes, verify_checksum
from lightning_methods.ood.cache import CorruptFileError, EmbeddingCache, load_verified, save_verified
from lightning_methods.ood.config import (
    SECTIONS,
    BaselineConfig,
    DiagnosticsConfig,
    EmbedConfig,
    FusionConfig,
    IDConfig,
    OODSetConfig,
    RDMConfig,
)
from lightning_methods.ood.datasets import (
    ImageSet,
    calibration_split,
    check_disjoint,
    corrupted_set,
    load_id_sets,
    load_ood_set,
)
from lightning_methods.ood.embedding import embed
from lightning_methods.ood.encoders import EncoderSpec, build_encoder
from lightning_methods.ood.evaluation import build_report
from lightning_methods.ood.features import EmbeddingSet, FeaturePreprocessor
from lightning_methods.ood.progress import ProgressLines, stage_lines
from lightning_methods.ood.stages import fit_rdm, load_rdm, rdm_package, score_sets, train_encoder
from lightning_methods.runs import StagedRun, config_fingerprint
from lightning_methods.utils import barrier, broadcast_object, get_rank
from lightning_methods.utils.quiet import quiet_wandb
from lightning_methods.utils.wandb import finish_open_run, log_config, plain

#: settings that never change results, besides lightning_methods.runs.NEUTRAL_KEYS
NEUTRAL = {"run_dir", "resume", "cache_dir", "cache_policy", "stop_after", "config", "print_table", "progress"}


def _key(*parts: str) -> str:
    return "__".join(parts)


class EncMin2LPipeline:
    """Runs the stages of the module docstring from a parsed ``lightning-methods-ood`` config.

    Args:
        parser: the parser that produced ``config`` (instantiates the trainer settings per stage).
        config: the parsed namespace.
    """

    def __init__(self, parser: Any, config: Any) -> None:
        self.parser, self.config = parser, config
        c = config.as_dict()
        self.id_cfg = IDConfig(**c["id"])
        self.ood_cfgs = [OODSetConfig(**d) for d in c.get("ood") or []]
        self.encoders = [EncoderSpec(**d) for d in c.get("encoders") or []]
        self.rdm_cfg, self.fusion = RDMConfig(**c["rdm"]), FusionConfig(**c["fusion"])
        self.diag, self.base = DiagnosticsConfig(**c["diagnostics"]), BaselineConfig(**c["baselines"])
        self.embed_cfg, self.variants = EmbedConfig(**c["embed"]), list(c["variants"])
        self.pca_dim, self.seed = c["pca_dim"], int(c["seed"])
        self.run_dir = Path(c["run_dir"]).expanduser()
        self.progress = bool(c.get("progress", True))
        self.cache = EmbeddingCache(c["cache_dir"] or self.run_dir / "features", c["cache_policy"])
        self._check()
        self.staged: StagedRun | None = None
        self._data: tuple[Any, dict[str, ImageSet]] | None = None
        self._features: dict[tuple[str, str], EmbeddingSet] = {}

    def _check(self) -> None:
        names = [e.name for e in self.encoders]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"need at least one encoder with distinct names, got {names}")
        sets = [s.name for s in self.ood_cfgs]
        if not sets or len(set(sets)) != len(sets):
            raise ValueError(f"need at least one OOD set with distinct names, got {sets}")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct and non-empty, got {self.variants}")
        for v in self.variants:
            FeaturePreprocessor(v)  # validates the name
        if self.id_cfg.calib_split == self.id_cfg.fit_split:
            raise ValueError(f"calibration splits overlap the RDM training split: id.calib_split is the fit split "
                             f"{self.id_cfg.fit_split!r}. Calibration data must be held-out ID data: leave calib_split "
                             "empty (calib_fractions of the fit split are held out) or name another split")

    # ------------------------------------------------------------------------------------------- plumbing
    def fingerprint(self) -> dict[str, Any]:
        cfg = {k: v for k, v in plain(self.config).items() if k not in NEUTRAL}
        return config_fingerprint(cfg)

    def make_trainer(self, stage: str | None = None, **overrides: Any) -> Trainer:
        """A Trainer with the config's ``trainer`` settings; ``stage`` gets its own W&B run, others log nothing."""
        cfg = self.config.clone()
        if stage is not None:
            self.staged.stage_logger_settings(cfg.trainer, stage)
            self._wandb_dir(cfg.trainer)
        init = self.parser.instantiate_classes(cfg)
        args = dict(init.trainer)
        if stage is None:
            args["logger"] = False
        args["default_root_dir"] = str(self.run_dir / (stage or "predict"))
        args.update(overrides)
        args["callbacks"] = [*(init.trainer.get("callbacks") or []), *overrides.get("callbacks", [])]
        trainer = Trainer(**args)
        quiet_wandb(trainer.loggers)  # no "anonymous setting has no effect" warning
        if trainer.world_size > 1 and not torch.distributed.is_initialized() and "WORLD_SIZE" not in os.environ:
            raise RuntimeError("the OOD pipeline runs several Trainers in one command: for several devices launch "
                               "it with torchrun (torchrun --nproc_per_node N -m lightning_methods.ood.cli --config "
                               "...), or set trainer.devices to 1")
        if stage is not None and trainer.is_global_zero:
            log_config(trainer.loggers, {**plain(self.config), "stage": stage})
        return trainer

    def _wandb_dir(self, trainer_config: Any) -> None:
        """A ``WandbLogger`` without a ``save_dir`` writes into the run directory (not the working directory)."""
        loggers = trainer_config.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if str(logger.get("class_path", "") if hasattr(logger, "get") else "").endswith("WandbLogger") and \
                    init_args is not None and init_args.get("save_dir") in (None, ".", ""):
                init_args["save_dir"] = str(self.run_dir)

    # ------------------------------------------------------------------------------------------- data
    def data(self) -> tuple[Any, dict[str, ImageSet]]:
        """The ID DataModule and every image set (loaded once, only when a stage needs images)."""
        if self._data is None:
            dm, id_sets = load_id_sets(self.id_cfg, self.seed)
            sets = {f"id_{k}": v for k, v in id_sets.items()}
            for spec in self.ood_cfgs:
                sets[spec.name] = load_ood_set(spec, self.id_cfg, dm, self.seed)
            for name in self.diag.corruptions:
                c = corrupted_set(sets["id_test"], name, self.diag.severity, self.seed)
                sets[f"id_test_{name}"] = c
            self._data = dm, sets
        return self._data

    def num_classes(self) -> int:
        """ID classes: ``len(id.classes)`` when the ID set is a class subset, else the DataModule's."""
        if self.id_cfg.classes is not None:
            return len(self.id_cfg.classes)
        return int(self.data()[0].num_classes)

    def features(self, encoder: str, name: str) -> EmbeddingSet:
        key = (encoder, name)
        if key not in self._features:
            record = self.staged.record(f"embed/{encoder}")
            self._features[key] = self.cache.load(encoder, name, record["sets"][name])
        return self._features[key]

    # ------------------------------------------------------------------------------------------- stages
    def _train_encoders(self) -> bool:
        for i, spec in enumerate(self.encoders):
            if spec.train is None:
                continue
            stage = f"encoder/{spec.name}"
            record = self.staged.record(stage)
            checkpoint = self._recorded_path(record["checkpoint"], stage) if record is not None else None
            if record is not None and not checkpoint.is_file():
                record = None  # deleted: train it again
            if record is not None:
                verify_checksum(checkpoint)  # a damaged checkpoint stops here, naming the file
            if record is None:
                dm, sets = self.data()
                ids = calibration_split(sets["id_fit"].index, self.id_cfg.calib_fractions, self.seed)["rdm_train"]
                fit = sets["id_fit"]
                pos = torch.searchsorted(fit.index, ids) if self.id_cfg.calib_split is None else slice(None)
                with stage_lines(stage, f"training {spec.backbone} on {len(fit.index[pos])} images", self.progress):
                    ckpt = train_encoder(spec.backbone, fit.images[pos], fit.targets[pos],
                                         num_classes=self.num_classes(), mean=dm.mean, std=dm.std,
                                         settings=spec.train, out_dir=self.run_dir / stage,
                                         make_trainer=partial(self.make_trainer, stage), seed=spec.seed,
                                         progress=self.progress)
                finish_open_run()
                if ckpt is None:
                    return False
                checkpoint = Path(ckpt)
                self.staged.mark_done(stage, {"checkpoint": self._record_path(checkpoint)})
            self.encoders[i] = EncoderSpec(**{**plain(spec.__dict__), "backbone": None, "train": None,
                                              "checkpoint": str(checkpoint)})
        return True

    def _record_path(self, path: Path) -> str:
        """A path as a stage record keeps it: relative to the run directory when it lies inside (a moved or copied
        run directory keeps finding its files), else absolute."""
        path, root = Path(path).resolve(), self.run_dir.resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    def _recorded_path(self, recorded: str, stage: str) -> Path:
        """The file a stage record names: a relative path lies in the run directory; an absolute one (the records
        of older runs) is taken as it is unless it is gone and the run directory holds the same file at the stage's
        own place (``<stage>/<file name>``: the run directory was moved or copied)."""
        path = Path(recorded)
        if not path.is_absolute():
            return self.run_dir / path
        moved = self.run_dir / stage / path.name
        return moved if not path.is_file() and moved.is_file() else path

    def _embed(self) -> None:
        for spec in self.encoders:
            stage = f"embed/{spec.name}"
            record = self.staged.record(stage)
            missing = [n for n in (record or {}).get("sets", {}) if not self.cache.path(spec.name, n).is_file()]
            if record is not None and not missing and self.cache.policy != "refresh":
                continue  # entries are verified against their checksums when they are loaded
            what = ("recomputing " + (", ".join(missing) if missing else "every entry (cache policy 'refresh')")
                    if record is not None else "embedding every image set")
            with stage_lines(stage, what, self.progress):
                self._embed_encoder(spec, stage, record)

    def _embed_encoder(self, spec: EncoderSpec, stage: str, record: dict[str, Any] | None) -> None:
        dm, sets = self.data()
        encoder, enc_fp = build_encoder(spec, self.num_classes(), tuple(dm.mean), tuple(dm.std))
        fingerprints, digests = {}, {}
        for name, s in sets.items():
            fp = {"encoder": enc_fp, "images": s.fingerprint}
            fingerprints[name] = fp
            found, reason = self.cache.lookup(spec.name, name, fp)  # every rank reads; only rank 0 writes
            if broadcast_object(found is not None):  # rank 0 decides, so every rank runs the same Trainers
                self._features[(spec.name, name)] = found or self.cache.load(spec.name, name, fp)
                digests[name] = recorded_hashes(self.cache.path(spec.name, name))[0]
                continue
            rank_zero_info(f"[ood] {stage}: embedding {name} ({reason})")
            fs = embed(encoder, s.images, s.targets, s.index, make_trainer=self._predict_trainer(stage, name),
                       batch_size=self.embed_cfg.batch_size, num_workers=self.embed_cfg.num_workers)
            digests[name] = broadcast_object(self.cache.store(spec.name, name, fs, fp) if get_rank() == 0 else None)
            barrier()
            self._features[(spec.name, name)] = fs
        old = (record or {}).get("sha256") or {}
        changed = sorted(n for n in old if n in digests and digests[n] != old[n])
        if changed and any(k.startswith(("rdm/", "score/", "report")) for k in self.staged.state.get("stages", {})):
            raise RuntimeError(
                f"the recomputed features of {spec.name} on {', '.join(changed)} differ from those the finished stages "
                f"of {self.run_dir} were computed from (a nondeterministic encoder or another machine); the run's RDMs "
                "and scores would no longer match its features. Start a new run directory (--run_dir) that reuses the "
                "cache (--cache_dir), or restore the old feature files")
        self.staged.mark_done(stage, {"sets": fingerprints, "sha256": digests,
                                      "dim": self.features(spec.name, "id_fit").dim})

    def _predict_trainer(self, stage: str, name: str) -> Any:
        """A factory of quiet predict Trainers (with the batch lines of ``stage`` on set ``name`` when progress is
        on)."""
        extra = [ProgressLines(stage, [name])] if self.progress else []
        return lambda **kw: self.make_trainer(None, **{**kw, "callbacks": [*kw.get("callbacks", []), *extra]})

    def _splits(self) -> dict[str, torch.Tensor]:
        path = self.run_dir / "splits.pt"
        if not self._done("splits", path):
            fit = self.features(self.encoders[0].name, "id_fit")
            if self.id_cfg.calib_split is None:
                split = calibration_split(fit.index, self.id_cfg.calib_fractions, self.seed)
            else:
                calib = self.features(self.encoders[0].name, "id_calib").index
                perm = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(self.seed))]
                half = len(perm) // 2
                split = {"rdm_train": fit.index, "calib_1": perm[:half].sort().values,
                         "calib_2": perm[half:].sort().values}
            check_disjoint(split["rdm_train"], {"calib_1": split["calib_1"], "calib_2": split["calib_2"]},
                           same_source=self.id_cfg.calib_split in (None, self.id_cfg.fit_split))
            limit = self.id_cfg.max_fit_samples
            if limit is not None and limit < len(split["rdm_train"]):
                keep = torch.randperm(len(split["rdm_train"]), generator=torch.Generator().manual_seed(self.seed))
                split["rdm_train"] = split["rdm_train"][keep[:limit]].sort().values
            digest = save_verified(split, path) if get_rank() == 0 else None
            barrier()
            self.staged.mark_done("splits", {**{k: len(v) for k, v in split.items()}, "sha256": digest})
        return load_verified(path, "calibration splits")

    def _split_set(self, encoder: str, role: str, splits: dict[str, torch.Tensor]) -> EmbeddingSet:
        source = "id_fit" if role == "rdm_train" or self.id_cfg.calib_split is None else "id_calib"
        fs = self.features(encoder, source) if encoder != "monolithic" else self._concat(source)
        return fs.subset(torch.searchsorted(fs.index, splits[role]))

    def _concat(self, name: str) -> EmbeddingSet:
        parts = [self.features(e.name, name) for e in self.encoders]
        return EmbeddingSet(torch.cat([p.features for p in parts], dim=1), parts[0].index, parts[0].targets)

    def eval_sets(self) -> list[str]:
        return ["id_test", *(s.name for s in self.ood_cfgs), *(f"id_test_{c}" for c in self.diag.corruptions)]

    def _fit_and_score(self, encoder: str, variant: str, splits: dict[str, torch.Tensor]) -> bool:
        key, rdm_stage, score_stage = _key(encoder, variant), f"rdm/{encoder}/{variant}", f"score/{encoder}/{variant}"
        package = self.run_dir / "rdm" / key / "rdm.pt"
        num_classes = self.num_classes() if self.rdm_cfg.conditional else None
        scores_path = self.run_dir / "scores" / f"{key}.pt"
        if not self._done(rdm_stage, package):
            train = self._split_set(encoder, "rdm_train", splits)
            pre = FeaturePreprocessor(variant, self.pca_dim).fit(train.features)
            with stage_lines(rdm_stage, f"fitting an RDM on {len(train.index)} x {pre.out_dim} features "
                             f"({self.rdm_cfg.max_epochs} epochs)", self.progress):
                model = fit_rdm(self.rdm_cfg, train, pre, num_classes=num_classes, out_dir=self.run_dir / "rdm" / key,
                                make_trainer=lambda **kw: self.make_trainer(rdm_stage.replace("/", "-"), **kw),
                                seed=self.seed, progress=rdm_stage if self.progress else None)
            finish_open_run()
            if model is None:
                return False
            digest = save_verified(rdm_package(model, pre), package) if get_rank() == 0 else None
            barrier()
            previous = self.staged.record(rdm_stage) or {}
            if previous.get("sha256") not in (None, broadcast_object(digest)):
                self._forget(score_stage)  # refitted to other weights: its scores are stale
            self.staged.mark_done(rdm_stage, {"params": model.net.num_parameters(), "dim": pre.out_dim,
                                              "sha256": broadcast_object(digest)})
        if not self._done(score_stage, scores_path):
            model, pre = load_rdm(package)
            sets = {r: self._split_set(encoder, r, splits) for r in ("calib_1", "calib_2")}
            for name in self.eval_sets():
                sets[name] = self.features(encoder, name) if encoder != "monolithic" else self._concat(name)
            total = sum(len(s.index) for s in sets.values())
            with stage_lines(score_stage, f"PF-ODE log-likelihoods of {total} samples in {len(sets)} sets",
                             self.progress):
                scores = score_sets(model, pre, sets, make_trainer=lambda **kw: self.make_trainer(None, **kw),
                                    batch_size=self.rdm_cfg.score_batch_size, conditional=self.rdm_cfg.conditional,
                                    progress=score_stage if self.progress else None)
            digest = save_verified(scores, scores_path) if get_rank() == 0 else None
            barrier()
            self._forget("report")
            self.staged.mark_done(score_stage, {"sets": len(scores), "sha256": broadcast_object(digest)})
        return True

    def _done(self, stage: str, path: Path) -> bool:
        """``stage`` finished and its output file exists (a deleted output is recomputed; under cache policy
        'refresh' a corrupt one is too, otherwise loading it stops naming the file)."""
        if not self.staged.is_done(stage) or not path.is_file():
            return False
        if self.cache.policy == "refresh":
            try:
                load_verified(path, stage)
            except CorruptFileError as err:
                rank_zero_info(f"[ood] {stage}: recomputing ({err})")
                return False
        return True

    def _forget(self, stage: str) -> None:
        if self.staged.state.get("stages", {}).pop(stage, None) is not None:
            self.staged.save_state()

    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage; returns ``{"status", ...}`` (the report files when done)."""
        stop = self.config.get("stop_after")
        self.staged = StagedRun(self.run_dir, "ood", self.fingerprint(), resume=bool(self.config.resume),
                                config_text=self.parser.dump(self.config, skip_unset=False), sections=SECTIONS)
        with self.staged:
            if not self._train_encoders():
                return {"status": "interrupted", "stage": "encoder"}
            self._embed()
            if stop == "embed":
                return {"status": "paused", "stage": "embed"}
            splits = self._splits()
            finished = sum(1 for k in self.staged.state.get("stages", {}) if k.startswith(("rdm/", "score/")))
            if finished and self.progress:
                rank_zero_info(f"[ood] {finished} RDM / score stages finished earlier are reused")
            jobs = [(e.name, v) for e in self.encoders for v in self.variants]
            if self.base.monolithic and len(self.encoders) > 1:
                jobs.append(("monolithic", self.base.monolithic_variant))
            for encoder, variant in jobs:
                if not self._fit_and_score(encoder, variant, splits):
                    return {"status": "interrupted", "stage": f"rdm/{encoder}/{variant}"}
            if stop == "score":
                return {"status": "paused", "stage": "score"}
            result = None
            saved = self.run_dir / "report" / "table.txt"
            if self.staged.is_done("report") and saved.is_file():  # same fingerprint: the same report
                return {"status": "done", "table": saved.read_text().rstrip("\n"),
                        "files": self.staged.record("report").get("files", []),
                        "report_dir": str(saved.parent)}
            if get_rank() == 0:
                with stage_lines("report", "calibration, min gates, baselines, diagnostics, metrics", self.progress):
                    result = build_report(self, jobs)
            barrier()
            if not self.staged.is_done("report"):
                self.staged.mark_done("report", {"files": sorted((result or {}).get("files", []))})
            return broadcast_object(result) or {"status": "done"}
