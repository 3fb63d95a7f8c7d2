"""hyperspherical prototypes for HPN (.npy): lightning-methods prototypes --classes 100 --dims 50 --out FILE.

Mettes, van der Pol, Snoek. *Hyperspherical Prototype Networks*. NeurIPS 2019, arXiv 1901.10514.

Optimises K unit prototypes in D dimensions for separation (the official ``prototypes.py`` update by default, seeded),
optionally with semantic priors from a class-embedding file (K rows in dataset class order), and writes them as a
(K, D) float32 ``.npy`` (default name ``prototypes-{D}d-{K}c.npy``) plus a ``.json`` next to it with the settings and
the reached separation. Use the file with ``--model.init_args.prototype_file FILE``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from lightning_methods.hpn.prototypes import (
    load_class_embeddings,
    optimize_prototypes,
    prototype_filename,
    save_prototypes,
    separation_loss,
)
from lightning_methods.utils import atomic_write_json, sha256_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-methods prototypes",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--classes", type=int, default=100, help="number of classes K")
    parser.add_argument("--dims", type=int, default=100, help="output dimension D (>= 2)")
    parser.add_argument("--out", type=Path, default=None, help="output .npy (default prototypes-{D}d-{K}c.npy)")
    parser.add_argument("--seed", type=int, default=300, help="seed of the Gaussian initialisation (official 300)")
    parser.add_argument("--iterations", type=int, default=10_000, help="SGD steps (official 10000)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD step size (official 0.1)")
    parser.add_argument("--persistent_momentum", action="store_true",
                        help="keep one momentum buffer across steps (the official script re-creates its optimizer "
                             "every step, so its momentum has no effect)")
    parser.add_argument("--momentum", type=float, default=0.9, help="momentum of --persistent_momentum")
    parser.add_argument("--embeddings", type=Path, default=None,
                        help="class embeddings (.npy/.pt/.txt/.csv, K rows in class order) for semantic priors")
    parser.add_argument("--neighbours", type=int, default=5, help="semantic neighbours per class")
    parser.add_argument("--prior_weight", type=float, default=1.0, help="weight of the semantic ranking term")
    parser.add_argument("--float64", action="store_true", help="optimise in float64 (file stays float32 unless set)")
    return parser


def check_writable(out: Path) -> None:
    """Stop with a clear message when ``out`` (and the ``.json`` beside it) cannot be written: its folder is created
    if missing and a temporary file is written and removed there.

    Raises:
        SystemExit: the folder cannot be created or written, or ``out`` is a folder.
    """
    if out.is_dir():
        raise SystemExit(f"--out {out} is a folder; give a file name ending in .npy")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".check"):
            pass
    except OSError as err:
        raise SystemExit(f"--out {out}: cannot write into {out.parent.resolve()} ({err.strerror or err}); choose a "
                         "writable path") from None


def main(args: list[str] | None = None) -> Path:
    """Run the command; returns the path of the written ``.npy``."""
    opts = build_parser().parse_args(args)
    if opts.dims < 2:
        raise SystemExit(f"--dims must be >= 2 (a cosine on a 1-d sphere is only +-1), got {opts.dims}")
    if opts.classes < 2:
        raise SystemExit(f"--classes must be >= 2, got {opts.classes}")
    for name in ("lr", "momentum", "prior_weight"):
        value = getattr(opts, name)
        if not math.isfinite(value):
            raise SystemExit(f"--{name} must be a finite number, got {value}")
    if opts.lr <= 0:
        raise SystemExit(f"--lr must be > 0, got {opts.lr}")
    if opts.iterations < 0:
        raise SystemExit(f"--iterations must be >= 0, got {opts.iterations}")
    out = opts.out if opts.out is not None else Path(prototype_filename(opts.classes, opts.dims))
    if out.suffix != ".npy":
        raise SystemExit(f"--out must end in .npy, got {out}")
    check_writable(out)  # before the optimisation, not after 10,000 steps
    embeddings = load_class_embeddings(opts.embeddings, opts.classes) if opts.embeddings else None
    start = time.perf_counter()
    protos = optimize_prototypes(
        opts.classes, opts.dims, opts.iterations, lr=opts.lr, momentum=opts.momentum,
        persistent_momentum=opts.persistent_momentum, seed=opts.seed, embeddings=embeddings,
        neighbours=opts.neighbours, prior_weight=opts.prior_weight,
        dtype=torch.float64 if opts.float64 else torch.float32,
    )
    seconds = time.perf_counter() - start
    loss, max_cos = separation_loss(protos)
    save_prototypes(out, protos if opts.float64 else protos.float())
    stats = {
        "file": str(out), "sha256": sha256_file(out), "classes": opts.classes, "dims": opts.dims,
        "seed": opts.seed, "iterations": opts.iterations, "lr": opts.lr,
        "update": "persistent-momentum" if opts.persistent_momentum else "official (no effective momentum)",
        "momentum": opts.momentum if opts.persistent_momentum else None,
        "embeddings": str(opts.embeddings) if opts.embeddings else None,
        "neighbours": opts.neighbours if opts.embeddings else None,
        "prior_weight": opts.prior_weight if opts.embeddings else None,
        "max_cosine": float(max_cos), "mean_max_cosine": float(loss),
        "simplex_bound": -1.0 / (opts.classes - 1) if opts.dims >= opts.classes - 1 else None,
        "seconds": round(seconds, 2),
    }
    atomic_write_json(out.with_suffix(".json"), stats)
    print(f"wrote {out} ({opts.classes} x {opts.dims}): max cosine {stats['max_cosine']:.4f}, mean max cosine "
          f"{stats['mean_max_cosine']:.4f} after {opts.iterations} steps ({seconds:.1f} s)")
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
