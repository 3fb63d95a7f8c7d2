"""Gaps found by mutation testing of the ImageNet-scale input pipeline: the order of files within a class, the
readers' refusals (negative WebVision labels, non-leaf devkit ids, a ground truth larger than expected, duplicate
class ids), the folder training order as a function of ``(seed, epoch)``, ``augment`` = ``crop`` / ``none``, the
device augmentation's ``(seed, step, rank)`` seed, noisy ImageNet's default hold-out, mini-WebVision's ILSVRC12 labels
in ``synsets_file`` order, the streaming order's seed, the streaming evaluation split over ranks with an odd count,
random access after epochs, ``sort-val``'s missing-image check and counts, and ``convert --classes_file``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from imagenet_tiny_tree import wnid, write_class_list, write_imagenet_tree, write_webvision_tree

from lightning_methods.datamodules import (
    ImageNetDataModule,
    NoisyImageNetDataModule,
    WebVisionDataModule,
    read_val_ground_truth,
)
from lightning_methods.datamodules.base import epoch_permutation
from lightning_methods.datamodules.imagenet_files import read_class_list, read_file_list
from lightning_methods.datamodules.jpeg_dataset import read_bytes
from lightning_methods.datamodules.jpeg_pipeline import normalize_uint8, train_image
from lightning_methods.datamodules.transforms import device_augment
from lightning_methods.imagenet.prepare import PrepareError
from lightning_methods.imagenet.prepare import main as prepare
from lightning_methods.utils.seeding import mix_seed

SMALL = dict(image_size=16, eval_resize=18, batch_size=4, num_workers=0)


# ------------------------------------------------------------------------------------------------ readers
def test_files_within_a_class_are_in_sorted_name_order(tmp_path):
    """Base index ``i`` is the ``i``-th file of the (class, file name)-sorted listing, whatever order the file system
    lists a folder in: label files, ``train_subset`` indices and converted data sets name samples by it."""
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=12, val_per_class=1)
    dm = ImageNetDataModule(str(root), num_classes=2, **SMALL)
    dm.setup("fit")
    names = [(Path(f).parent.name, Path(f).name) for f in dm.train_set.files]
    assert names == sorted(names) and len(names) == 24
    # "_10.JPEG" sorts before "_2.JPEG": the order is by name, not by the number in it
    assert names[1] == (wnid(0), f"{wnid(0)}_10.JPEG")


def test_webvision_list_refuses_a_negative_label(tmp_path):
    """A label below 0 is malformed (WebVision's labels are 0..999): refused naming the line, not kept as a class
    below every mini-WebVision cut."""
    (tmp_path / "a.jpg").write_bytes(b"x")
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg 0\na.jpg -1\n")
    with pytest.raises(ValueError, match="list.txt, line 2"):
        read_file_list(tmp_path, lst, "", num_classes=50)


def test_devkit_ground_truth_refuses_a_non_leaf_synset(tmp_path):
    """The devkit's ids 1..1000 are the leaf synsets of meta.mat; the tiny meta.mat also holds a non-leaf synset
    (id K+1 with two children), which no validation image can be labelled with."""
    root = write_imagenet_tree(tmp_path / "in", classes=4, per_class=1, val_per_class=1, flat_val=True)
    gt = root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    assert len(read_val_ground_truth(gt, expected=4)) == 4
    gt.write_text(gt.read_text() + "5\n")  # K + 1: the non-leaf synset n00001740
    with pytest.raises(ValueError, match="line 5: '5' is not an ILSVRC2012_ID"):
        read_val_ground_truth(gt, expected=None)


def test_ground_truth_with_more_images_than_expected_is_refused(tmp_path):
    """``expected`` is the exact count: a ground truth that lists more images than the folder should hold (another
    release, a merged file) is refused like a truncated one."""
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=1, val_per_class=2, flat_val=True)
    gt = root / "LOC_val_solution.csv"
    assert len(read_val_ground_truth(gt, expected=4)) == 4
    with pytest.raises(ValueError, match="labels 4 images, ILSVRC2012's validation set has 3"):
        read_val_ground_truth(gt, expected=3)


def test_class_list_refuses_duplicate_ids(tmp_path):
    """A class listed twice would give one folder two labels (and a class count one too large)."""
    path = write_class_list(tmp_path / "c.txt", [wnid(0), wnid(1), wnid(0)])
    with pytest.raises(ValueError, match=f"{wnid(0)!r} appears twice"):
        read_class_list(path)


# ------------------------------------------------------------------------------------------------ folder loaders
def test_folder_training_order_is_the_seeded_permutation_of_each_epoch(tmp_path):
    """The folder path's training order is ``epoch_permutation(N, seed, epoch)`` (drop_last: the first
    ``N // batch * batch`` positions): a new order every epoch, and another one for another seed."""
    root = write_imagenet_tree(tmp_path / "in", classes=2, per_class=5, val_per_class=1)
    orders = {}
    for seed in (7, 8):
        dm = ImageNetDataModule(str(root), num_classes=2, seed=seed, **SMALL)
        dm.setup("fit")
        loader = dm.train_dataloader()
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does
            got = torch.cat([b["index"] for b in loader]).tolist()
            assert got == epoch_permutation(10, seed, epoch)[:8].tolist(), (seed, epoch)
            orders[seed, epoch] = got
    assert orders[7, 0] != orders[7, 1] and orders[7, 0] != orders[8, 0]


def test_augment_crop_draws_no_flip_and_none_trains_on_the_evaluation_crop(tmp_path):
    """``augment="crop"``: the RandomResizedCrop of ``(seed, epoch, index)`` without its flip; ``augment="none"``:
    the evaluation crop. (With the flip some of the 12 samples differ: checked so the first half is not vacuous.)"""
    root = write_imagenet_tree(tmp_path / "in", classes=3, per_class=4, val_per_class=1)
    crop = ImageNetDataModule(str(root), num_classes=3, augment="crop", **SMALL)
    crop.setup("fit")
    flipped = 0
    for i in range(len(crop.train_set)):
        path, index = crop.train_set.files[i], int(crop.train_set.indices[i])
        args = (read_bytes(path), crop.seed, 0, index, 16)
        no_flip = train_image(*args, False, crop.scale, crop.ratio, name=path)
        assert torch.equal(crop.train_set[i]["image"], no_flip), i
        flipped += not torch.equal(train_image(*args, True, crop.scale, crop.ratio, name=path), no_flip)
    assert flipped > 0
    none = ImageNetDataModule(str(root), num_classes=3, augment="none", **SMALL)
    none.setup("fit")
    for i in range(len(none.train_set)):
        assert torch.equal(none.train_set[i]["image"], none.train_set.images[i]), i


def test_device_augmentation_is_seeded_by_seed_step_and_rank():
    """``pad_crop`` (HPN's recipe) augments a uint8 batch on the device with the generator of
    ``mix_seed(seed, global_step, global_rank)``: each rank draws its own crops and flips for the same step."""
    dm = ImageNetDataModule(num_classes=4, train_transform="pad_crop", seed=3, image_size=8, eval_resize=8)
    image = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = {}
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(training=True, global_step=5, global_rank=rank)
        batch = dm.on_after_batch_transfer({"image": image.clone(), "target": torch.zeros(16, dtype=torch.long)}, 0)
        generator = torch.Generator().manual_seed(mix_seed(3, 5, rank))
        expected = normalize_uint8(device_augment(image.clone(), "standard", generator), dm.mean, dm.std)
        assert torch.equal(batch["image"], expected), rank  # the same ops on the same uint8: bitwise equal
        out[rank] = batch["image"]
    assert not torch.equal(out[0], out[1])


# ------------------------------------------------------------------------------------------------ noisy / WebVision
def test_noisy_imagenet_holds_out_a_tenth_by_default_and_refuses_streaming(tmp_path):
    """docs/imagenet.md: a noisy hold-out ``val_split`` of 0.1 as for CIFAR (40 training images: 36 / 4); the noise
    is generated over the folder tree's labels, so a streaming data set is refused."""
    root = write_imagenet_tree(tmp_path / "in", classes=4, per_class=10, val_per_class=1, size=(20, 24))
    dm = NoisyImageNetDataModule(data_dir=str(root), num_classes=4, **SMALL)
    dm.setup("fit")
    assert len(dm.train_set) == 36 and len(dm.val_set) == 4 and len(dm.test_set) == 4
    assert sorted(dm.train_set.indices.tolist() + dm.val_set.indices.tolist()) == list(range(40))
    with pytest.raises(ValueError, match="unset data.streaming"):
        NoisyImageNetDataModule(data_dir=str(root), num_classes=4, val_split=0.0, streaming=str(tmp_path / "s"))


def test_webvision_ilsvrc12_labels_follow_the_synsets_file(tmp_path):
    """``eval_on="ilsvrc12"``: label ``c`` is the ``c``-th wnid of ``synsets_file`` (WebVision's label order), not
    the sorted order of the first classes."""
    web = write_webvision_tree(tmp_path / "web", classes=3, extra_classes=0, per_class=1, val_per_class=1)
    imagenet = write_imagenet_tree(tmp_path / "in", classes=4, per_class=1, val_per_class=2)
    order = [wnid(2), wnid(0), wnid(3)]  # not sorted; wnid(1) lies beyond the 3 classes
    synsets = write_class_list(tmp_path / "synsets.txt", [*order, wnid(1)])
    dm = WebVisionDataModule(str(web), num_classes=3, eval_on="ilsvrc12", imagenet_dir=str(imagenet),
                             synsets_file=str(synsets), **SMALL)
    dm.setup("fit")
    assert len(dm.test_set) == 6
    for f, t in zip(dm.test_set.files, dm.test_set.targets.tolist()):
        assert Path(f).parent.name == order[t], (f, t)


# ------------------------------------------------------------------------------------------------ prepare-data
def test_sort_val_refuses_a_missing_listed_image_and_counts_per_class(tmp_path):
    """``sort-val`` stops when the ground truth lists an image that is in no folder (an incomplete download) before
    moving anything; a complete folder is sorted and the command reports the class and image counts."""
    root = write_imagenet_tree(tmp_path / "in", classes=3, per_class=1, val_per_class=2, flat_val=True)
    gt = root / "LOC_val_solution.csv"
    gone = root / "val" / "ILSVRC2012_val_00000004.JPEG"
    saved = gone.read_bytes()
    gone.unlink()
    with pytest.raises(PrepareError, match="1 images of the ground truth .* ILSVRC2012_val_00000004.JPEG"):
        prepare(["sort-val", str(root / "val"), "--ground_truth", str(gt), "--expected", "6"])
    assert len(list((root / "val").glob("*.JPEG"))) == 5  # nothing moved
    gone.write_bytes(saved)
    result = prepare(["sort-val", str(root / "val"), "--ground_truth", str(gt), "--expected", "6"])
    assert (result["classes"], result["images"]) == (3, 6)


# ------------------------------------------------------------------------------------------------ streaming
@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """3 classes x 4 training and x 3 validation images (9: an odd count), converted in small chunks."""
    pytest.importorskip("litdata")
    tmp = tmp_path_factory.mktemp("odd")
    root = write_imagenet_tree(tmp / "tree", classes=3, per_class=4, val_per_class=3, size=(24, 28))
    prepare(["convert", str(root), str(tmp / "conv"), "--num_workers", "1", "--chunk_bytes", "2kb"])
    return root, tmp / "conv"


def test_streaming_order_follows_the_seed(odd):
    """The streaming training order is drawn from the DataModule's ``seed`` (litdata's own default would give every
    seed the same order): the same seed gives the same epoch order, another seed another one."""
    root, conv = odd

    def order(seed):
        dm = ImageNetDataModule(str(root), streaming=str(conv), num_classes=3, seed=seed, **SMALL)
        dm.setup("fit")
        return torch.cat([b["index"] for b in dm.train_dataloader()]).tolist()

    first = order(0)
    assert sorted(first) == list(range(12)) and order(0) == first and order(1) != first


def test_streaming_evaluation_keeps_every_sample_on_two_ranks(odd, monkeypatch):
    """Two ranks (litdata's detected environment patched) over 9 validation images: the evaluation data set keeps
    ``drop_last=False`` (litdata turns a default into True under several processes and drops a sample), rank 0
    reads 5 and rank 1 4 images, each image once."""
    import litdata.streaming.dataset as litdata_dataset
    from litdata.utilities.env import _DistributedEnv

    root, conv = odd
    seen = []
    for rank in (0, 1):
        env = _DistributedEnv(world_size=2, global_rank=rank, num_nodes=1)
        monkeypatch.setattr(litdata_dataset._DistributedEnv, "detect", classmethod(lambda cls, env=env: env))
        dm = ImageNetDataModule(str(root), streaming=str(conv), num_classes=3, eval_batch_size=2,
                                **dict(SMALL, batch_size=2))
        dm.setup("fit")
        assert dm.val_set.drop_last is False
        seen.append(torch.cat([b["index"] for b in dm.val_dataloader()]).tolist())
    assert [len(s) for s in seen] == [5, 4] and sorted(seen[0] + seen[1]) == list(range(9))


def test_balanced_ranges_give_the_first_parts_the_extra_samples():
    """``balanced_ranges``: contiguous parts covering ``range(total)``, the first ``total % parts`` one larger."""
    pytest.importorskip("litdata")
    from lightning_methods.datamodules.streaming_litdata import balanced_ranges

    assert balanced_ranges(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert balanced_ranges(9, 2) == [(0, 5), (5, 9)]
    assert balanced_ranges(2, 3) == [(0, 1), (1, 2), (2, 2)]


def test_streaming_random_access_stays_at_epoch_zero_after_epochs(odd):
    """``train_set[i]`` (SSAM-F's Fisher samples) is the training sample of epoch 0, also after the loader has run
    two epochs (litdata's epoch counter then stands at 2 or 3): the folder path's ``train_set[i]``."""
    root, conv = odd
    folder = ImageNetDataModule(str(root), num_classes=3, **SMALL)
    folder.setup("fit")
    by_index = {int(folder.train_set[i]["index"]): folder.train_set[i]["image"] for i in range(12)}
    dm = ImageNetDataModule(str(root), streaming=str(conv), num_classes=3, **SMALL)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in range(2):
        assert len([b for b in loader]) == 3
    assert int(dm.train_set.current_epoch) >= 2
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        assert torch.equal(item["image"], by_index[int(item["index"])]), i


def test_convert_with_a_classes_file_writes_its_labels_and_metadata(tmp_path):
    """``convert --classes_file``: the label order of the file (not the sorted folders), a class subset converted
    alone, and ``lightning_methods.json`` naming those classes, their count and each split's sample count."""
    pytest.importorskip("litdata")
    root = write_imagenet_tree(tmp_path / "tree", classes=3, per_class=2, val_per_class=1, size=(20, 24))
    classes = write_class_list(tmp_path / "classes.txt", [wnid(2), wnid(0)])
    out = tmp_path / "conv"
    prepare(["convert", str(root), str(out), "--num_workers", "1", "--classes_file", str(classes)])
    meta = json.loads((out / "lightning_methods.json").read_text())
    assert meta["classes"] == [wnid(2), wnid(0)] and meta["num_classes"] == 2
    assert meta["splits"]["train"]["samples"] == 4 and meta["splits"]["val"]["samples"] == 2
    dm = ImageNetDataModule(str(root), streaming=str(out), num_classes=2, **SMALL)
    dm.setup("fit")
    folder = ImageNetDataModule(str(root), classes_file=str(classes), **SMALL)
    folder.setup("fit")
    dm.train_set.set_mode("eval")
    got = {int(dm.train_set[i]["index"]): int(dm.train_set[i]["target"]) for i in range(len(dm.train_set))}
    assert got == {i: int(t) for i, t in enumerate(folder.train_set.targets)}
    assert [int(t) for t in folder.train_set.targets] == [0, 0, 1, 1]  # wnid(2) first
    assert all(wnid(2) in f for f in folder.train_set.files[:2])
