"""``train_set[i]`` of the file-backed ImageNet DataModule is one unbatched training sample, as for the in-memory
``IndexedTensorDataset``, with the training crop of the workers; SSAM-F's Fisher pass (batch-1 samples of the training
set) therefore sees training crops, also when the training loader ships undecoded bytes."""

from __future__ import annotations

import pytest
import torch
from imagenet_tiny_tree import write_imagenet_tree
from torch.optim import SGD

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import SSAMMaskCallback
from lightning_methods.datamodules import ImageNetDataModule
from lightning_methods.datamodules.base import IndexedTensorDataset
from lightning_methods.datamodules.jpeg_dataset import read_bytes
from lightning_methods.datamodules.jpeg_pipeline import normalize_uint8, train_image
from lightning_methods.optim import SSAM

from helpers import TinyNet, quiet_trainer

SMALL = dict(num_classes=4, image_size=24, eval_resize=28, batch_size=4, eval_batch_size=4, num_workers=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_set_item_is_one_training_sample(tmp_path):
    root = write_imagenet_tree(tmp_path / "in", classes=4, per_class=3, val_per_class=1)
    dm = ImageNetDataModule(str(root), **SMALL)
    dm.setup("fit")
    ds = dm.train_set
    reference = IndexedTensorDataset(torch.zeros(2, 3, 24, 24, dtype=torch.uint8), torch.tensor([0, 1]))[0]
    differs_from_eval = 0
    for i in range(len(ds)):
        item = ds[i]
        assert set(reference) <= set(item)
        for key in reference:  # same shapes and dtypes as the in-memory dataset's item: not batch-shaped
            assert item[key].shape == reference[key].shape and item[key].dtype == reference[key].dtype, key
        path = ds.files[i]
        crop = train_image(read_bytes(path), dm.seed, 0, int(item["index"]), 24, True, dm.scale, dm.ratio, name=path)
        assert torch.equal(item["image"], crop)  # the training crop + flip of (seed, epoch 0, base index)
        assert int(item["target"]) == int(ds.targets[i])
        differs_from_eval += not torch.equal(item["image"], ds.images[i])
    assert differs_from_eval > 0  # (a crop of scale (0.08, 1) equal to every center crop would be a bug)
    pad = ImageNetDataModule(str(root), train_transform="pad_crop", **SMALL)
    pad.setup("fit")  # pad_crop: the evaluation crop, augmented on the device
    assert torch.equal(pad.train_set[0]["image"], pad.train_set.images[0])


@pytest.mark.parametrize("decode_on_device", [False, True], ids=["worker_decode", "bytes_loader"])
def test_ssam_fisher_pass_sees_training_crops(tmp_path, decode_on_device):
    root = write_imagenet_tree(tmp_path / "in", classes=4, per_class=3, val_per_class=1)
    dm = ImageNetDataModule(str(root), decode_on_device=decode_on_device, **SMALL)
    model = ImageClassifier(
        TinyNet(4), num_classes=4, channels_last=False, optimizer=lambda p: SSAM(p, SGD, rho=0.2, sparsity=0.5)
    )
    cb = SSAMMaskCallback(mode="fisher", update_freq=1, num_samples=6, seed=0)
    seen: list[torch.Tensor] = []
    fisher_samples = cb.fisher_samples

    def spy(trainer, pl_module):
        for image, target in fisher_samples(trainer, pl_module):
            seen.append(image.detach().clone())
            yield image, target

    cb.fisher_samples = spy
    quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[cb]).fit(model, datamodule=dm)
    assert len(seen) == 6 and all(x.shape == (1, 3, 24, 24) and x.dtype == torch.float32 for x in seen)
    ds = dm.train_set
    train_crops = [normalize_uint8(ds[i]["image"][None], dm.mean, dm.std) for i in range(len(ds))]
    eval_crops = [normalize_uint8(ds.images[i][None], dm.mean, dm.std) for i in range(len(ds))]
    for x in seen:  # the same function on the same uint8 crop: bitwise equal
        assert any(torch.equal(x, t) for t in train_crops)
    assert sum(any(torch.equal(x, e) for e in eval_crops) for x in seen) < len(seen)
