"""AttentionLocality: per-layer, per-head Mean Attention Distance and normalized entropy of a ViT during training.

From "Inducing Spatial Locality in Vision Transformers through the Training Protocol" (Santiago Toledo and Martinez,
arXiv 2605.16390): the locality of early-layer attention (minimum MAD over heads) measured on a fixed set of clean
test images. The measures are ``lightning_methods.analysis.attention``; this callback only schedules them, shards the
probe over ranks, and writes/logs the results.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from lightning_methods.analysis.attention import MAD_NORMS, attention_locality, locality_summary, probe_indices
from lightning_methods.datamodules.transforms import normalize
from lightning_methods.utils import atomic_write_json, atomic_write_text, gather_by_index
from lightning_methods.vit_locality.settings import LocalitySettings

SUMMARY_KEYS = ("min_mad_{n}/layer0", "min_mad_{n}/early", "mean_mad_{n}/early")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` through a temporary file and ``os.replace`` (a reader never sees a truncated array)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    tmp.replace(path)


class AttentionLocality(Callback):
    """Logs MAD (three normalisations) and normalized entropy per layer and head on a fixed probe set.

    Every ``every_n_epochs`` epochs and at the end of fit: the probe images (a seeded choice of ``num_images`` images
    of the DataModule's test split, normalized, no augmentation) go through the model in eval mode without gradients
    (the mode of every module, the weights and the norm statistics are left exactly as they were; training keeps
    fused attention). Under DDP each rank probes a shard and the per-image results are gathered by index, so the
    numbers equal those of one process. Logged (``locality/`` prefix): ``mad_{grid,diag,maxdist}/L{l}H{h}``,
    ``entropy/L{l}H{h}``, ``min_mad_{norm}/layer0``, ``min_mad_{norm}/early`` (layers 0..max_early_layer),
    ``mean_mad_{norm}/early``, ``mean_entropy/early``. Files (rank 0) in ``<run dir>/locality/epoch_NNN/`` (NNN =
    completed epochs):
    ``mad_patch.npy`` / ``entropy.npy`` (layers x heads), ``*_per_image.npy``, ``summary.json``, ``mad_heatmap.png``,
    ``layer_curves.png``, ``attention_maps.png``; ``history.csv`` lists every probe. The PNGs also go to W&B.

    Args:
        settings: what is measured (:class:`lightning_methods.vit_locality.LocalitySettings`: probe-set size and seed,
            batch size, split, CLS handling, extraction method, early layers, token geometry); in YAML a mapping
            under ``settings:``. Default: ``LocalitySettings()`` (1000 test images, seed 0).
        every_n_epochs: probe period in epochs (also probes at the end of fit).
        num_map_images: probe images drawn in ``attention_maps.png`` (0: no picture).
        map_layers: layers whose heads are drawn in ``attention_maps.png``.
        heatmap_norm: the MAD normalisation of the heat map and curves.
        log_images: send the PNGs to W&B when a WandbLogger is used.
        out_dir: folder for the files (default: ``<run dir>/locality``, next to ``checkpoints/``).
        module_attr: attribute of the LightningModule holding the ViT (default ``"backbone"``; the module itself
            when absent or None).
    """

    def __init__(self, settings: LocalitySettings | None = None, every_n_epochs: int = 10, num_map_images: int = 4,
                 map_layers: list[int] | None = None, heatmap_norm: Literal["grid", "diag", "maxdist"] = "grid",
                 log_images: bool = True, out_dir: str | None = None, module_attr: str | None = "backbone") -> None:
        if settings is not None and not isinstance(settings, LocalitySettings):
            raise TypeError(f"settings must be a LocalitySettings, got {type(settings).__name__}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be positive, got {every_n_epochs}")
        if heatmap_norm not in MAD_NORMS:
            raise ValueError(f"heatmap_norm must be one of {MAD_NORMS}, got {heatmap_norm!r}")
        s = self.settings = settings if settings is not None else LocalitySettings()
        # the settings' values as attributes, read by the probe below
        self.num_images, self.seed, self.batch_size, self.split = s.num_images, s.seed, s.batch_size, s.split
        self.include_cls, self.renormalize, self.method = s.include_cls, s.renormalize, s.method
        self.max_early_layer = s.max_early_layer
        self.every_n_epochs, self.num_map_images = every_n_epochs, num_map_images
        self.map_layers = [0, 1] if map_layers is None else list(map_layers)
        self.heatmap_norm, self.log_images = heatmap_norm, log_images
        self.out_dir, self.module_attr = out_dir, module_attr
        self.geometry = s.geometry
        self.history: list[dict[str, Any]] = []
        self._last_step = -1
        self._images: torch.Tensor | None = None
        self._indices: torch.Tensor | None = None
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] = ((0.5,), (0.25,))

    # ------------------------------------------------------------------------------------------------ probe set
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        dataset = getattr(dm, f"{self.split}_set", None)
        images = getattr(dataset, "images", None)
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or not hasattr(dm, "mean"):
            raise ValueError(f"AttentionLocality probes the '{self.split}_set' of an ImageDataModule (uint8 images "
                             f"with mean/std); {type(dm).__name__} has none")
        self._indices = probe_indices(len(images), self.num_images, self.seed)
        self._images = images[self._indices]
        self._stats = (tuple(dm.mean), tuple(dm.std))

    def model(self, pl_module: LightningModule) -> torch.nn.Module:
        if self.module_attr and hasattr(pl_module, self.module_attr):
            return getattr(pl_module, self.module_attr)
        return pl_module

    # ------------------------------------------------------------------------------------------------ schedule
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.probe(trainer, pl_module, epochs_done=trainer.current_epoch + 1)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.probe(trainer, pl_module, epochs_done=trainer.current_epoch)

    # ------------------------------------------------------------------------------------------------ the probe
    def measure(self, pl_module: LightningModule, images: torch.Tensor, keep_maps: int = 0) -> dict:
        x = normalize(images, *self._stats)
        return attention_locality(
            self.model(pl_module),
            x,
            self.batch_size,
            include_cls=self.include_cls,
            renormalize=self.renormalize,
            method=self.method,
            keep_maps=keep_maps,
            **self.geometry,
        )

    def probe(self, trainer: Trainer, pl_module: LightningModule, epochs_done: int | None = None) -> dict[str, float]:
        """Measure, gather over ranks, log and write; returns the logged summary (without the prefix).

        ``epochs_done`` (completed epochs; default ``trainer.current_epoch``) names the output folder
        ``epoch_NNN``.
        """
        if self._images is None:
            self.on_fit_start(trainer, pl_module)
        world, rank = trainer.world_size, trainer.global_rank
        if len(self._images) < world:
            raise ValueError(f"the locality probe set ({len(self._images)} images) must have at least one image per "
                             f"process ({world}); raise num_images")
        shard = torch.arange(rank, len(self._images), world)
        res = self.measure(pl_module, self._images[shard])
        dev = pl_module.device
        _, mad, ent = gather_by_index(shard.to(dev), res["mad"].to(dev), res["entropy"].to(dev))
        mad, ent = mad.cpu(), ent.cpu()
        grid = res["grid"]
        norms = MAD_NORMS if grid[0] == grid[1] else ()
        summary = locality_summary(mad.mean(0), ent.mean(0), grid, self.max_early_layer, norms)
        self._last_step = trainer.global_step
        epoch = trainer.current_epoch if epochs_done is None else epochs_done
        record = {"epoch": epoch, "global_step": trainer.global_step}
        record.update({k.format(n=n): summary[k.format(n=n)] for n in norms for k in SUMMARY_KEYS})
        record["mean_entropy/early"] = summary["mean_entropy/early"]
        self.history.append(record)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"locality/{k}": v for k, v in summary.items()}, step=trainer.global_step)
            self._write(trainer, pl_module, mad, ent=ent, res=res, summary=summary, epoch=epoch)
        return summary

    # ------------------------------------------------------------------------------------------------ outputs
    def run_dir(self, trainer: Trainer) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        ckpt = getattr(trainer.checkpoint_callback, "dirpath", None)
        if ckpt:
            return Path(ckpt).parent / "locality"
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is not None and logger.save_dir and logger.name and logger.version is not None:
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return Path(logger.save_dir) / str(logger.name) / version / "locality"
        return Path(trainer.default_root_dir) / "locality"

    def _write(self, trainer: Trainer, pl_module: LightningModule, mad: torch.Tensor, ent: torch.Tensor,
               res: dict, summary: dict[str, float], epoch: int) -> None:
        from lightning_methods.analysis import attention_plots as plots
        from lightning_methods.analysis.attention import mad_scale
        from lightning_methods.vit_locality.report import strict_json

        root = self.run_dir(trainer)
        out = root / f"epoch_{epoch:03d}"
        out.mkdir(parents=True, exist_ok=True)
        mad_mean, ent_mean = mad.mean(0).numpy(), ent.mean(0).numpy()
        for name, arr in (("mad_patch", mad_mean), ("entropy", ent_mean), ("mad_patch_per_image", mad.numpy()),
                          ("entropy_per_image", ent.numpy()), ("probe_indices", self._indices.numpy())):
            _save_npy(out / f"{name}.npy", arr)
        settings = {"epoch": epoch, "global_step": trainer.global_step, "num_images": len(self._images),
                    "seed": self.seed, "split": self.split, "include_cls": self.include_cls,
                    "renormalize": self.renormalize, "grid": list(res["grid"]), "patch_size": list(res["patch_size"]),
                    "num_prefix_tokens": res["num_prefix_tokens"]}
        atomic_write_json(out / "summary.json", strict_json({"settings": settings, "values": summary}))
        grid = res["grid"]
        norm = self.heatmap_norm if grid[0] == grid[1] else "patch"
        scaled = mad_mean / mad_scale(norm, grid)
        label = f"MAD ({norm}-normalised)" if norm != "patch" else "MAD (patches)"
        images = {"mad_heatmap": plots.plot_mad_heatmap(scaled, out / "mad_heatmap.png",
                                                        f"MAD per head, epoch {epoch}", label),
                  "layer_curves": plots.plot_layer_curves(scaled, ent_mean, out / "layer_curves.png", label,
                                                          f"epoch {epoch}")}
        if self.num_map_images > 0:
            k = min(self.num_map_images, len(self._images))
            maps = self.measure(pl_module, self._images[:k], keep_maps=k)["maps"]
            images["attention_maps"] = plots.plot_attention_maps(maps.numpy(), self._images[:k].numpy(), grid,
                                                                 out / "attention_maps.png", self.map_layers)
        self._write_history(root)
        if self.log_images:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    for key, path in images.items():
                        logger.log_image(key=f"locality/{key}", images=[str(path)], step=trainer.global_step)

    def _write_history(self, root: Path) -> None:
        keys = list(dict.fromkeys(k for record in self.history for k in record))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(root / "history.csv", buf.getvalue())

    # ------------------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, num_images=self.num_images,
                                        seed=self.seed, split=self.split)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self._last_step = int(state_dict.get("last_step", -1))
