"""CINIC-10 DataModule on small files written in the official layout (CINIC-10/{train,valid,test}/<class>/*.png):
labels in CIFAR-10 order, pixel-exact images, the uint8 cache, train + valid, and clear errors offline."""

from __future__ import annotations

import pytest
import torch
from tunnel_fakes import CLASSES, write_fake_cinic

from lightning_methods.datamodules import CINIC10DataModule


def test_reads_the_official_layout_and_caches(tmp_path):
    arrays = write_fake_cinic(tmp_path, per_class=2)
    dm = CINIC10DataModule(data_dir=str(tmp_path), download=False, num_workers=0, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.test_set) == 20 and dm.num_classes == 10
    assert torch.equal(dm.train_set.targets, torch.from_numpy(arrays["train_y"]))  # airplane=0 ... truck=9
    assert torch.equal(dm.test_set.images, torch.from_numpy(arrays["test_x"]).permute(0, 3, 1, 2))
    cache = tmp_path / "CINIC-10" / ".cache" / "train_uint8.pt"
    assert cache.is_file()
    stored = torch.load(cache, weights_only=True)
    assert stored["n_files"] == 20 and torch.equal(stored["images"], dm.train_set.images)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"image", "target", "index"} and batch["image"].dtype == torch.uint8
    both = CINIC10DataModule(data_dir=str(tmp_path), download=False, train_splits=["train", "valid"], num_workers=0)
    both.setup("fit")
    assert len(both.train_set) == 40
    assert torch.equal(both.train_set.targets[20:], torch.from_numpy(arrays["valid_y"]))


def test_clear_errors(tmp_path):
    dm = CINIC10DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"CINIC-10 is not available: missing the split folders \['train', "
                                                r"'test'\] and download=False.*--data.download true"):
        dm.prepare_data()
    write_fake_cinic(tmp_path, per_class=1)
    (tmp_path / "CINIC-10" / "test" / CLASSES[3]).rename(tmp_path / "CINIC-10" / "test" / "kitten")
    with pytest.raises(FileNotFoundError, match=r"missing \['cat'\], unknown \['kitten'\]"):
        CINIC10DataModule(data_dir=str(tmp_path), download=False, cache=False).setup("fit")
    with pytest.raises(ValueError, match="train_splits"):
        CINIC10DataModule(train_splits=["test"])
