"""Readers of the ImageNet-scale formats on tiny trees written in the real layouts: class folders, the validation
sorter with both official ground-truth formats, WebVision list files, class lists; and bad trees."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from imagenet_tiny_tree import (
    devkit_ids,
    read_answers,
    wnid,
    write_class_list,
    write_imagenet_tree,
    write_webvision_tree,
)

from lightning_methods.cli import main
from lightning_methods.cli_runs import package_error
from lightning_methods.datamodules import (
    ImageNet200DataModule,
    ImageNetDataModule,
    WebVisionDataModule,
    read_val_ground_truth,
)
from lightning_methods.datamodules.jpeg_pipeline import BadImageError
from lightning_methods.imagenet.prepare import PrepareError

SMALL = dict(image_size=24, eval_resize=28, batch_size=4, num_workers=0)


def labels_of(dataset) -> dict[str, int]:
    return {Path(f).name: int(t) for f, t in zip(dataset.files, dataset.targets)}


def test_folder_tree_labels_follow_sorted_wnids(tmp_path):
    root = write_imagenet_tree(tmp_path / "in", classes=4, per_class=3, val_per_class=2)
    answers = {Path(p).name: c for p, c in read_answers(root).items()}
    dm = ImageNetDataModule(str(root), num_classes=4, **SMALL)
    dm.setup("fit")
    assert len(dm.train_set) == 12 and len(dm.test_set) == 8 and dm.val_set is dm.test_set
    assert labels_of(dm.train_set) == {k: v for k, v in answers.items() if not k.startswith("ILSVRC")}
    assert labels_of(dm.test_set) == {k: v for k, v in answers.items() if k.startswith("ILSVRC")}
    assert torch.equal(dm.train_set.indices, torch.arange(12))
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.uint8


def test_class_subsets_and_class_list_order(tmp_path):
    root = write_imagenet_tree(tmp_path / "in", classes=4, per_class=2, val_per_class=1)
    first = ImageNetDataModule(str(root), class_subset=2, **SMALL)
    first.setup("fit")
    assert first.num_classes == 2 and sorted(set(first.train_set.targets.tolist())) == [0, 1]
    assert all(wnid(0) in f or wnid(1) in f for f in first.train_set.files)
    # an ImageNet-200-style class list in its own (non-sorted) order decides the labels
    classes = write_class_list(tmp_path / "classes.txt", [wnid(3), wnid(1)])
    dm = ImageNet200DataModule(classes_file=str(classes), data_dir=str(root), **SMALL)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.classes == [wnid(3), wnid(1)]
    for f, t in zip(dm.train_set.files + dm.test_set.files, torch.cat([dm.train_set.targets, dm.test_set.targets])):
        assert wnid(3 if t == 0 else 1) in f
    with pytest.raises(ValueError, match="classes_file"):
        ImageNet200DataModule(data_dir=str(root)).setup("fit")


def test_num_classes_mismatch_and_missing_class_folder(tmp_path):
    root = write_imagenet_tree(tmp_path / "in", classes=3, per_class=2, val_per_class=1)
    with pytest.raises(ValueError, match="3 class folders but num_classes=1000"):
        ImageNetDataModule(str(root), **SMALL).setup("fit")
    shutil.rmtree(root / "val" / wnid(1))
    with pytest.raises(FileNotFoundError, match=f"class folder .*val/{wnid(1)} is missing"):
        ImageNetDataModule(str(root), num_classes=3, **SMALL).setup("fit")


@pytest.mark.parametrize("fmt", ["csv", "devkit"])
def test_sort_val_from_official_ground_truth(tmp_path, fmt):
    root = write_imagenet_tree(tmp_path / "in", classes=4, per_class=1, val_per_class=3, flat_val=True)
    gt = root / ("LOC_val_solution.csv" if fmt == "csv" else
                 "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
    assert devkit_ids(4) != [1, 2, 3, 4]  # the devkit's ids are not the sorted order: the mapping is exercised
    main(["prepare-data", "sort-val", str(root / "val"), "--ground_truth", str(gt), "--expected", "12"])
    answers = {Path(p).name: c for p, c in read_answers(root).items() if p.startswith("val/")}
    sorted_files = {p.name: p.parent.name for p in (root / "val").glob("*/*.JPEG")}
    assert sorted_files == {name: wnid(c) for name, c in answers.items()}
    assert not list((root / "val").glob("*.JPEG"))
    dm = ImageNetDataModule(str(root), num_classes=4, **SMALL)
    dm.setup("fit")
    assert labels_of(dm.test_set) == answers
    # idempotent: a second run finds everything in place
    main(["prepare-data", "sort-val", str(root / "val"), "--ground_truth", str(gt), "--expected", "12"])
    assert {p.name: p.parent.name for p in (root / "val").glob("*/*.JPEG")} == sorted_files


def test_unsorted_validation_folder_names_the_sort_val_command_that_runs(tmp_path):
    """A user who forgot sort-val is told the command; copied as printed (with the ground truth for ``...``), it
    parses and sorts the folder."""
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=1, val_per_class=2, flat_val=True)
    dm = ImageNetDataModule(str(root), num_classes=2, **SMALL)
    with pytest.raises(FileNotFoundError, match="flat validation folder") as err:
        dm.setup("fit")
    command = re.search(r"`lightning-methods (prepare-data sort-val [^`]*)`", str(err.value)).group(1)
    gt = root / "LOC_val_solution.csv"
    main(command.replace("...", str(gt)).split() + ["--expected", "4"])
    ImageNetDataModule(str(root), num_classes=2, **SMALL).setup("fit")
    assert not list((root / "val").glob("*.JPEG"))


def test_ground_truth_errors_name_the_file(tmp_path):
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=1, val_per_class=2, flat_val=True)
    gt = root / "LOC_val_solution.csv"
    with pytest.raises(ValueError, match=f"{gt} labels 4 images, ILSVRC2012's validation set has 50000"):
        read_val_ground_truth(gt)
    lines = gt.read_text().splitlines()
    short = tmp_path / "short.csv"
    short.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(PrepareError, match="ILSVRC2012_val_00000004.JPEG is not listed in the ground truth"):
        main(["prepare-data", "sort-val", str(root / "val"), "--ground_truth", str(short), "--expected", "0"])
    bad = tmp_path / "bad.csv"
    bad.write_text(lines[0] + "\nILSVRC2012_val_00000001,tench 1 2 3 4\n")
    with pytest.raises(ValueError, match=f"{bad}, line 2"):
        read_val_ground_truth(bad, expected=None)
    devkit = root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text(devkit.read_text() + "999\n")
    with pytest.raises(ValueError, match="line 5: '999' is not an ILSVRC2012_ID"):
        read_val_ground_truth(devkit, expected=None)


def test_corrupt_jpeg_is_named(tmp_path):
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=2, val_per_class=1)
    bad = root / "train" / wnid(1) / f"{wnid(1)}_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:2] + b"\x00" * 40)
    dm = ImageNetDataModule(str(root), num_classes=2, **SMALL)
    dm.setup("fit")
    with pytest.raises(BadImageError, match=str(bad)):
        list(dm.train_dataloader())
    with pytest.raises(PrepareError, match=str(bad)):
        main(["prepare-data", "convert", str(root), str(tmp_path / "out"), "--num_workers", "1"])


@pytest.mark.parametrize("batched", [False, True], ids=["per_image", "batched_decode"])
def test_corrupt_jpeg_decoded_on_the_device_is_named(tmp_path, monkeypatch, batched):
    """With decode_on_device (the default on CUDA) the workers ship the bytes of a truncated JPEG, whose header is
    intact; the error names its file, not "batch image i" (per-image decoding on a CPU trainer) or nvJPEG's bare
    error (the batched decode: here torchvision's CPU decoder, given the batch as on CUDA, refuses it alike)."""
    from lightning_methods.datamodules import jpeg_pipeline

    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=2, val_per_class=1)
    bad = root / "train" / wnid(1) / f"{wnid(1)}_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:-200])
    dm = ImageNetDataModule(str(root), num_classes=2, decode_on_device=True, **dict(SMALL, batch_size=4))
    dm.setup("fit")
    batch = dm.transfer_batch_to_device(next(iter(dm.train_dataloader())), torch.device("cpu"), 0)
    assert "jpeg" in batch and "box" in batch  # bytes on the "device": nothing decoded in the loader
    if batched:
        together = jpeg_pipeline.decode_together
        monkeypatch.setattr(jpeg_pipeline, "decode_together", lambda data, size, device, *args: together(
            data, size, "cpu", *args))
        batch["target"] = batch["target"].to("meta")  # a device other than the CPU takes the batched decode
    with pytest.raises(BadImageError, match=f"{bad}: cannot decode") as err:
        dm.on_after_batch_transfer(batch, 0)
    assert str(package_error(err.value)).startswith(f"{bad}: cannot decode")  # what the command line prints


def test_empty_jpeg_is_named(tmp_path):
    """A 0-byte image (an interrupted download) in the evaluation split: the evaluation loader, the lazy images of
    the selection callbacks and ``convert`` stop naming it (torch.frombuffer's own error named no file)."""
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=2, val_per_class=1)
    (empty,) = (root / "val" / wnid(1)).iterdir()
    empty.write_bytes(b"")
    dm = ImageNetDataModule(str(root), num_classes=2, **SMALL)
    dm.setup("fit")
    with pytest.raises(BadImageError, match=f"{empty}: empty file"):
        list(dm.val_dataloader())
    with pytest.raises(BadImageError, match=f"{empty}: empty file"):
        dm.test_set.images[dm.test_set.files.index(str(empty))]
    with pytest.raises(PrepareError, match=f"{empty}: empty file"):
        main(["prepare-data", "convert", str(root), str(tmp_path / "out"), "--num_workers", "1"])


def test_webvision_lists_first_classes_and_ilsvrc12_eval(tmp_path):
    web = write_webvision_tree(tmp_path / "web", classes=3, extra_classes=2, per_class=3, val_per_class=2)
    dm = WebVisionDataModule(str(web), num_classes=3, **SMALL)
    dm.setup("fit")
    train_lines = (web / "info" / "train_filelist_google.txt").read_text().split()
    listed = {str(web / p): int(c) for p, c in zip(train_lines[::2], train_lines[1::2]) if int(c) < 3}
    assert dict(zip(dm.train_set.files, dm.train_set.targets.tolist())) == listed
    assert dm.train_set.files == [f for f in listed]  # list-file order, base index = line position
    assert sorted(dm.test_set.targets.tolist()) == [0, 0, 1, 1, 2, 2]
    assert all("val_images_256" in f for f in dm.test_set.files)
    imagenet = write_imagenet_tree(tmp_path / "in", classes=5, per_class=1, val_per_class=2)
    ilsvrc = WebVisionDataModule(str(web), num_classes=3, eval_on="ilsvrc12", imagenet_dir=str(imagenet), **SMALL)
    ilsvrc.setup("fit")
    assert len(ilsvrc.test_set) == 6
    for f, t in zip(ilsvrc.test_set.files, ilsvrc.test_set.targets.tolist()):
        assert f"/val/{wnid(t)}/" in f  # synsets.txt order: label c = wnid(c)
    with pytest.raises(ValueError, match="imagenet_dir"):
        WebVisionDataModule(str(web), eval_on="ilsvrc12")
    (web / "info" / "val_filelist.txt").write_text("val000001.jpg\n")
    with pytest.raises(ValueError, match="val_filelist.txt, line 1"):
        WebVisionDataModule(str(web), num_classes=3, **SMALL).setup("fit")
