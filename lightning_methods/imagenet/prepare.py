"""prepare ImageNet-scale data: sort the validation folder, convert a tree to streaming format, write a demo tree.

Subcommands:

  sort-val VAL_DIR --ground_truth FILE   move the flat ILSVRC2012 validation images into val/<wnid>/ folders, from
                                         LOC_val_solution.csv or the devkit's ILSVRC2012_validation_ground_truth.txt
                                         (with its meta.mat, --meta; default: beside the file)
  convert SRC OUT                        write SRC/train and SRC/val (class folders) in litdata's streaming format
                                         to OUT/train and OUT/val (a folder or an s3:// URL): the JPEG bytes
                                         undecoded, the label and the sample's index; train with --data.streaming OUT
  demo DIR                               an ImageNet-layout tree of crops of scikit-learn's two sample photographs

Bad inputs stop with the file at fault: a missing class folder, an unreadable image, a ground-truth file with the
wrong number of images or an image it does not list.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lightning_methods.datamodules.imagenet_files import (
    IMAGE_SUFFIXES,
    list_class_folders,
    read_class_list,
    read_val_ground_truth,
    scan_image_folder,
)


class PrepareError(ValueError):
    """A data tree or file that cannot be prepared (the message names it)."""


# ---------------------------------------------------------------------------------------------------- sort-val
def sort_val(val_dir: str | Path, ground_truth: str | Path, meta: str | Path | None = None,
             expected: int | None = 50000, copy: bool = False) -> dict[str, int]:
    """Move (or copy) ``val_dir/<ImageId>.JPEG`` into ``val_dir/<wnid>/``; returns ``{wnid: count}``.

    Idempotent: images already in their class folder are left alone, so an interrupted run is simply repeated.

    Raises:
        PrepareError: an image the ground truth does not list, a listed image that is in no folder, or a ground
            truth of the wrong size (naming the file).
    """
    val_dir = Path(val_dir).expanduser()
    if not val_dir.is_dir():
        raise PrepareError(f"validation folder {val_dir} does not exist")
    labels = read_val_ground_truth(ground_truth, meta, expected)
    flat = sorted(p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    unknown = [p for p in flat if p.stem not in labels]
    if unknown:
        raise PrepareError(f"{unknown[0]} is not listed in the ground truth {ground_truth} ({len(unknown)} such "
                           "images): wrong ground-truth file for this folder?")
    present = {p.stem for p in flat} | {p.stem for p in val_dir.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [s for s in labels if s not in present]
    if missing:
        raise PrepareError(f"{len(missing)} images of the ground truth {ground_truth} are in neither {val_dir} nor "
                           f"its class folders, e.g. {missing[0]}.JPEG: an incomplete download?")
    for path in flat:
        target = val_dir / labels[path.stem] / path.name
        target.parent.mkdir(exist_ok=True)
        (shutil.copy2 if copy else os.replace)(path, target)
    counts: dict[str, int] = {}
    for wnid in labels.values():
        counts[wnid] = counts.get(wnid, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------- convert
def _split_items(src: Path, split: str, classes: list[str]) -> list[tuple[str, int, int]]:
    files, labels = scan_image_folder(src / split, classes)
    return [(f, label, i) for i, (f, label) in enumerate(zip(files, labels))]


def encode_item(item: tuple[str, int, int]) -> dict[str, Any]:
    """One stored sample: the undecoded image bytes (PNG / CMYK / grayscale files re-encoded as RGB JPEG), label,
    index (the position in the folder DataModule's file order)."""
    from lightning_methods.datamodules.jpeg_dataset import read_bytes
    from lightning_methods.datamodules.jpeg_pipeline import rgb_jpeg_bytes

    path, label, index = item
    data, _, _ = rgb_jpeg_bytes(read_bytes(path), path)
    return {"jpeg": data, "label": int(label), "index": int(index)}


def verify_images(items: list[tuple[str, int, int]], threads: int) -> None:
    """Decode every image once (threads) and stop at the first unreadable one, naming it."""
    from concurrent.futures import ThreadPoolExecutor

    from lightning_methods.datamodules.jpeg_dataset import read_bytes
    from lightning_methods.datamodules.jpeg_pipeline import decode_rgb

    def check(item: tuple[str, int, int]) -> None:
        decode_rgb(read_bytes(item[0]), item[0])

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(check, items))


def convert(src: str | Path, out: str, splits: tuple[str, ...] = ("train", "val"), classes_file: str | None = None,
            chunk_bytes: str = "64MB", num_workers: int = 1, verify: bool = True) -> dict[str, Any]:
    """Write ``src/<split>/<class>/*`` as litdata-optimized ``out/<split>`` (see the module docstring); returns the
    summary also written to ``out/lightning_methods.json`` (a local folder or an ``s3://`` URL)."""
    from lightning_methods.datamodules.jpeg_pipeline import BadImageError
    from lightning_methods.datamodules.streaming import require_litdata, split_url, write_meta

    litdata = require_litdata()
    src = Path(src).expanduser()
    classes = read_class_list(classes_file) if classes_file else list_class_folders(src / splits[0])
    summary: dict[str, Any] = {"source": str(src), "num_classes": len(classes), "classes": classes, "splits": {}}
    for split in splits:
        items = _split_items(src, split, classes)
        start = time.perf_counter()
        try:
            if verify:
                verify_images(items, num_workers * 2)
            for item in items[:1]:
                encode_item(item)  # fail early, in this process, on a bad first file
        except BadImageError as err:
            raise PrepareError(str(err)) from err
        litdata.optimize(fn=encode_item, inputs=items, output_dir=split_url(out, split), chunk_bytes=chunk_bytes,
                         num_workers=num_workers, mode="overwrite", verbose=False, start_method="fork"
                         if os.name == "posix" else None)
        summary["splits"][split] = {"samples": len(items), "seconds": round(time.perf_counter() - start, 2)}
    write_meta(out, summary)
    return summary


# ---------------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-methods prepare-data", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sort-val", help="sort the flat ILSVRC2012 validation folder into class folders")
    s.add_argument("val_dir", type=Path, help="the folder with ILSVRC2012_val_*.JPEG")
    s.add_argument("--ground_truth", required=True, type=Path,
                   help="LOC_val_solution.csv or the devkit's ILSVRC2012_validation_ground_truth.txt")
    s.add_argument("--meta", type=Path, default=None, help="the devkit's meta.mat (default: beside the ground truth)")
    s.add_argument("--expected", type=int, default=50000, help="images the ground truth must list (0: any)")
    s.add_argument("--copy", action="store_true", help="copy instead of moving")
    c = sub.add_parser("convert", help="convert class folders to litdata's streaming format")
    c.add_argument("src", type=Path, help="the folder with train/<class>/ and val/<class>/")
    c.add_argument("out", help="output folder or s3:// URL (train/ and val/ are written inside)")
    c.add_argument("--splits", nargs="+", default=["train", "val"], help="sub-folders to convert")
    c.add_argument("--classes_file", default=None, help="class list (label order); default: sorted train folders")
    c.add_argument("--chunk_bytes", default="64MB", help="litdata chunk size")
    c.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="conversion processes")
    c.add_argument("--no_verify", action="store_true", help="skip decoding every image once before converting")
    d = sub.add_parser("demo", help="an ImageNet-layout tree of crops of scikit-learn's sample photographs")
    d.add_argument("out", type=Path, help="output folder (train/ and val/ are written inside)")
    d.add_argument("--per_class", type=int, default=32, help="training crops per photograph")
    d.add_argument("--val_per_class", type=int, default=8, help="validation crops per photograph")
    d.add_argument("--size", type=int, default=128, help="side of the written crops")
    d.add_argument("--seed", type=int, default=0, help="seed of the crop positions")
    return parser


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run one subcommand; returns its summary (also printed as JSON)."""
    opts = build_parser().parse_args(args)
    start = time.perf_counter()
    if opts.command == "sort-val":
        counts = sort_val(opts.val_dir, opts.ground_truth, opts.meta, opts.expected or None, opts.copy)
        result: dict[str, Any] = {"classes": len(counts), "images": sum(counts.values())}
    elif opts.command == "convert":
        result = convert(
            opts.src,
            opts.out,
            tuple(opts.splits),
            classes_file=opts.classes_file,
            chunk_bytes=opts.chunk_bytes,
            num_workers=opts.num_workers,
            verify=not opts.no_verify,
        )
        result = {k: v for k, v in result.items() if k != "classes"}
    else:
        from lightning_methods.imagenet.demo import write_demo_tree

        result = write_demo_tree(opts.out, opts.per_class, opts.val_per_class, opts.size, opts.seed)
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result, indent=1))
    return result
