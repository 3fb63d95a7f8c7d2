"""attention-locality table from ViT checkpoints (lightning-methods locality / lightning-methods-locality).

    lightning-methods locality runs/lightning-methods/*/checkpoints/last.ckpt --out locality_cifar100
    lightning-methods locality runs/ --data_dir data --num_images 1000 --norm grid
    lightning-methods locality Baseline=run_a/last.ckpt Modern=run_b/last.ckpt

For "Inducing Spatial Locality in Vision Transformers through the Training Protocol" (arXiv 2605.16390). Each
checkpoint's ViT is rebuilt from its hyperparameters, probed on a fixed seeded subset of the clean test split
(``--num_images``, default 1,000), and evaluated on the whole test split. Its condition (Baseline, Baseline+CutMix,
..., Modern) is read from the stored DataModule/model hyperparameters (augment, cutmix_alpha, label_smoothing), or
given as ``LABEL=PATH``. Runs of one condition (seeds) are averaged: min MAD over the heads of layer 0 and of layers
0..2 (mean +- std), early-layer mean MAD and entropy, test accuracy. The table is printed and written to ``--out``
(table.md / table.csv / per_checkpoint.csv / locality.json / mad_by_layer.png; with ``--wandb_project P`` the plot
also goes to a new W&B run of project ``P``). Per-checkpoint results are cached in
``--out``/cache (keyed by the checkpoint's SHA-256 and the probe settings), so adding seeds later only probes the new
checkpoints. Checkpoints with different token grids or datasets cannot share one table (error).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lightning_methods.runs import new_wandb_id
from lightning_methods.utils import atomic_write_json, sha256_file
from lightning_methods.utils.wandb import log_pictures
from lightning_methods.vit_locality.checkpoints import BY_CLASSES, DATASETS, checkpoint_record, evaluation_set
from lightning_methods.vit_locality.report import write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-methods locality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files, folders (every last.ckpt below them), or "
                                                       "LABEL=PATH to name the condition yourself")
    parser.add_argument("--out", default="locality_report", help="output folder (default: locality_report)")
    parser.add_argument("--dataset", default="auto", choices=["auto", *DATASETS],
                        help="test set to probe; auto: from the number of classes (10/100/200)")
    parser.add_argument("--data_dir", default=None, help="dataset folder (default: the checkpoint's data_dir)")
    parser.add_argument("--download", action="store_true", help="download the dataset when missing")
    parser.add_argument("--num_images", type=int, default=1000, help="probe-set size (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe-set choice (default 0)")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--include_cls", action="store_true", help="keep the CLS key in the attention rows")
    parser.add_argument("--no_renormalize", action="store_true", help="do not renormalize rows after dropping CLS")
    parser.add_argument("--norm", default="grid", choices=["grid", "diag", "maxdist", "patch"],
                        help="MAD normalisation of the printed table (the JSON has all)")
    parser.add_argument("--max_early_layer", type=int, default=2, help="early layers are 0..this (default 2)")
    parser.add_argument("--no_accuracy", action="store_true", help="skip the test-accuracy pass")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no_cache", action="store_true", help="recompute every checkpoint")
    parser.add_argument("--wandb_project", default=None,
                        help="also log mad_by_layer.png to a new W&B run (locality-<out folder>) in this project")
    parser.add_argument("--wandb_mode", choices=("online", "offline"), default=None,
                        help="W&B mode of that run (default: W&B's own setting, e.g. WANDB_MODE)")
    return parser


def expand(items: list[str]) -> list[tuple[str | None, Path]]:
    """``(label or None, checkpoint path)`` for each argument; folders give every ``last.ckpt`` below them.

    Raises:
        FileNotFoundError: an argument that is neither a file nor a folder with checkpoints.
    """
    out: list[tuple[str | None, Path]] = []
    for item in items:
        label, path = None, Path(item)
        if not path.exists() and "=" in item:
            label, path = item.split("=", 1)[0], Path(item.split("=", 1)[1])
        if path.is_dir():
            found = sorted(path.rglob("last.ckpt"))
            if not found:
                raise FileNotFoundError(f"no last.ckpt below the folder {path}")
            out += [(label, f) for f in found]
        elif path.is_file():
            out.append((label, path))
        else:
            raise FileNotFoundError(f"checkpoint {path} does not exist (give files, folders or LABEL=PATH)")
    return out


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the command; returns the table rows."""
    opts = build_parser().parse_args(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device
    settings = {"num_images": opts.num_images, "seed": opts.seed, "include_cls": opts.include_cls,
                "renormalize": not opts.no_renormalize, "accuracy": not opts.no_accuracy, "dataset": opts.dataset,
                "data_dir": opts.data_dir}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(opts.out)
    evalsets: dict[tuple[str, str], dict] = {}

    def evalset(info: dict[str, Any]) -> dict[str, Any]:
        n = int(info["hparams"]["num_classes"])
        dataset = opts.dataset if opts.dataset != "auto" else BY_CLASSES.get(n)
        if dataset is None:
            raise ValueError(f"cannot tell the dataset of a {n}-class checkpoint: pass --dataset")
        data_dir = opts.data_dir or info["data_hparams"].get("data_dir") or "data"
        if (dataset, str(data_dir)) not in evalsets:
            evalsets[(dataset, str(data_dir))] = evaluation_set(dataset, data_dir, opts.download)
        return evalsets[(dataset, str(data_dir))]

    records = []
    for label, path in expand(opts.checkpoints):
        cache = out / "cache" / f"{sha256_file(path)[:24]}_{key}.json"
        if cache.is_file() and not opts.no_cache:
            record = json.loads(cache.read_text())
        else:
            record = checkpoint_record(
                path,
                evalset,
                opts.num_images,
                seed=opts.seed,
                batch_size=opts.batch_size,
                include_cls=opts.include_cls,
                renormalize=not opts.no_renormalize,
                accuracy=not opts.no_accuracy,
                device=device,
            )
            atomic_write_json(cache, record)
        record.update(checkpoint=str(path), condition=label or record["condition"])
        print(f"{record['condition']:<16} {path}")
        records.append(record)
    rows, md = write_report(records, out, opts.norm, opts.max_early_layer)
    print()
    print(md)
    print(f"written to {out}/ (table.md, table.csv, per_checkpoint.csv, locality.json, mad_by_layer.png)")
    if opts.wandb_project:
        settings = {"project": opts.wandb_project, "name": f"locality-{out.resolve().name}", "job_type": "locality",
                    "id": new_wandb_id(), "save_dir": str(out.resolve()),
                    **({"mode": opts.wandb_mode} if opts.wandb_mode else {})}
        log_pictures({"locality/mad_by_layer": out / "mad_by_layer.png"}, settings=settings)
    return rows
