"""FederatedDataModule on CIFAR files written in the real pickle format and on the bundled digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_methods.datamodules import FederatedDataModule
from lightning_methods.federated.partition import PartitionSettings


def _order(dm: FederatedDataModule) -> list[int]:
    return torch.cat([b["index"] for b in dm.train_dataloader()]).tolist()


def test_cifar100_clients_batches_and_statistics(fake_cifar_root, tmp_path):
    root, arrays = fake_cifar_root
    dm = FederatedDataModule("cifar100", data_dir=str(root), download=False, batch_size=8, seed=1,
                             partition=PartitionSettings(num_clients=4, classes_per_client=25))
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 100 and sum(dm.train_sizes()) == 200 and sum(len(t) for t in dm.client_test) == 100
    pool_labels = np.concatenate([arrays["cifar100"]["train_y"], arrays["cifar100"]["test_y"]])
    for i in range(4):
        dm.set_client(i, round=3)
        batch = next(iter(dm.train_dataloader()))
        assert set(batch) == {"image", "target", "index", "client"} and batch["image"].dtype == torch.uint8
        assert (batch["client"] == i).all() and len(batch["target"]) == 8
        assert torch.equal(batch["target"], torch.from_numpy(pool_labels[batch["index"].numpy()]))
        classes = set(dm.client_train[i].targets.tolist())
        assert len(classes) == 25 and set(dm.client_test[i].targets.tolist()) <= classes
    path = dm.write_statistics(tmp_path / "partition.json")
    stats = json.loads(path.read_text())["clients"]
    assert [s["train"] for s in stats] == dm.train_sizes()
    assert dm.statistics_summary()["partition/classes_min"] == 25


def test_client_round_order_is_keyed_by_seed_client_round(fake_cifar_root):
    root, _ = fake_cifar_root
    dm = FederatedDataModule("cifar10", data_dir=str(root), download=False, batch_size=5, seed=0,
                             partition=PartitionSettings(num_clients=2, scheme="iid"))
    dm.set_client(1, round=2)
    first = _order(dm)
    dm.set_client(0, round=2)
    dm.set_client(1, round=2)
    assert _order(dm) == first
    dm.set_client(1, round=3)
    assert _order(dm) != first and sorted(_order(dm)) == sorted(first)
    fixed = FederatedDataModule("cifar10", data_dir=str(root), download=False, batch_size=5, shuffle=False,
                                partition={"num_clients": 2, "scheme": "iid"})  # a mapping works too
    fixed.set_client(1, 2)
    assert _order(fixed) == sorted(_order(fixed))  # HtFLlib: the fixed local order every epoch


def test_normalisation_and_digits_offline():
    dm = FederatedDataModule("digits", partition=PartitionSettings(num_clients=3, scheme="dirichlet", alpha=0.5),
                             batch_size=16)
    dm.setup()
    assert dm.num_classes == 10 and sum(dm.train_sizes()) + sum(len(t) for t in dm.client_test) == 1797
    batch = next(iter(dm.client_loader(0, "test")))
    out = dm.normalize_batch(batch)
    assert out["image"].dtype == torch.float32 and abs(float(out["image"].mean())) < 1.5


def test_missing_data_and_bad_client(tmp_path):
    dm = FederatedDataModule("cifar100", data_dir=str(tmp_path / "nowhere"), download=False,
                             partition=PartitionSettings(num_clients=2))
    with pytest.raises(FileNotFoundError, match="CIFAR-100 is not available"):
        dm.prepare_data()
    digits = FederatedDataModule("digits", partition=PartitionSettings(num_clients=2))
    with pytest.raises(ValueError, match="client 5 does not exist"):
        digits.set_client(5)
    with pytest.raises(ValueError, match="dataset must be"):
        FederatedDataModule("svhn")
    with pytest.raises(ValueError, match="classes_per_client=11 is impossible"):
        FederatedDataModule("digits", partition=PartitionSettings(num_clients=2, classes_per_client=11)).setup()
