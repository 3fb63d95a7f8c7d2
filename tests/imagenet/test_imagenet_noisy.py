"""The label-noise machinery on the file-backed DataModules: noisy ImageNet labels from the package's generator with
``clean_target`` in batches, and one selection round (learning-time history, the Early Cutting scorer, training on
the selected subset) on a tiny tree; WebVision's own labels through the same interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from imagenet_tiny_tree import write_imagenet_tree, write_webvision_tree

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import PredictionHistoryCallback
from lightning_methods.datamodules import NoisyImageNetDataModule, WebVisionDataModule, make_noisy_labels
from lightning_methods.noisy_labels import SelectionConfig, compute_early_cut

from helpers import TinyNet, quiet_trainer

SMALL = dict(num_classes=4, image_size=16, eval_resize=18, batch_size=8, eval_batch_size=16, num_workers=0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_imagenet_tree(tmp_path_factory.mktemp("noisy") / "in", classes=4, per_class=10, val_per_class=2,
                               size=(20, 24))


def test_noisy_labels_are_the_generators_and_travel_in_batches(tree, tmp_path):
    dm = NoisyImageNetDataModule(data_dir=str(tree), noise_rate=0.4, noise_seed=3, val_split=0.25,
                                 label_file=str(tmp_path / "labels.pt"), **SMALL)
    dm.setup("fit")
    clean = torch.arange(4).repeat_interleave(10)
    expected = make_noisy_labels(clean.numpy(), "sym", 0.4, 4, 3)
    assert torch.equal(dm.clean_targets, clean) and torch.equal(dm.noisy_targets, torch.as_tensor(expected))
    assert 0 < dm.noise_stats["noise/realized_rate"] < 1
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10 and len(dm.test_set) == 8
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "target", "index", "clean_target"}
    assert torch.equal(batch["target"], dm.noisy_targets[batch["index"]])
    assert torch.equal(batch["clean_target"], clean[batch["index"]])
    again = NoisyImageNetDataModule(data_dir=str(tree), noise_rate=0.4, noise_seed=3, val_split=0.25,
                                    label_file=str(tmp_path / "labels.pt"), **SMALL)
    again.setup("fit")
    assert torch.equal(again.noisy_targets, dm.noisy_targets)
    with pytest.raises(ValueError, match="instance"):
        NoisyImageNetDataModule(data_dir=str(tree), noise_type="instance", **SMALL)


def test_selection_round_cut_and_subset_on_a_tiny_tree(tree):
    dm = NoisyImageNetDataModule(data_dir=str(tree), noise_rate=0.4, noise_seed=0, val_split=0.25, **SMALL)
    history = PredictionHistoryCallback(warm_up_epochs=-1, k=1, keep_rate=None, lag=0, history_transform="eval")
    torch.manual_seed(0)
    model = ImageClassifier(backbone=TinyNet(4), num_classes=4)
    quiet_trainer(max_epochs=3, callbacks=[history]).fit(model, datamodule=dm)
    # the history covers exactly the training split, with the noisy labels and the clean ones for analysis
    assert torch.equal(history.indices, dm.train_set.indices)
    assert torch.equal(history.targets, dm.noisy_targets[history.indices])
    assert torch.equal(history.clean_targets, dm.clean_targets[history.indices])
    selection = history.current_selection()
    assert len(selection) > 0 and set(selection.tolist()) <= set(dm.train_set.indices.tolist())
    cfg = SelectionConfig(cutting_rate=1.0, num_candidates=4, conf_quantile=0.5, grad_quantile=0.5,
                          score_batch_size=8)
    cut, scores = compute_early_cut(model, dm, selection, cfg)
    assert len(scores["loss"]) == len(selection) and torch.isfinite(scores["loss"]).all()
    # the scorer decoded the same evaluation crops the loaders produce
    pos = torch.searchsorted(dm.train_set.indices, selection[:3])
    assert torch.equal(dm.train_set.images[pos], dm.train_set.with_mode("eval").__getitems__(pos.tolist())["image"])
    assert set(cut.selected.tolist()) | set(cut.removed.tolist()) == set(selection.tolist())
    dm.set_train_subset(cut.selected)
    assert sorted(dm.train_set.indices.tolist()) == sorted(cut.selected.tolist())
    seen = torch.cat([b["index"] for b in dm._file_loader(dm.train_set, train=False)])
    assert sorted(seen.tolist()) == sorted(cut.selected.tolist())
    assert dm.noise_stats["noise/train_subset_size"] == len(cut.selected)


def test_webvision_subsets_for_selection_rounds(tmp_path):
    web = write_webvision_tree(tmp_path / "web", classes=2, extra_classes=1, per_class=4, val_per_class=1)
    dm = WebVisionDataModule(str(web), num_classes=2, image_size=16, eval_resize=18, batch_size=2, num_workers=0,
                             train_subset=[0, 3, 5])
    dm.setup("fit")
    assert dm.train_set.indices.tolist() == [0, 3, 5] and len(dm.full_train_set) == 8
    dm.set_train_subset(None)
    assert len(dm.train_set) == 8
    with pytest.raises(ValueError, match="not in the training split"):
        dm.set_train_subset([99])
    assert np.array_equal(dm.train_set.targets.numpy(), dm.full_train_set.targets.numpy())
