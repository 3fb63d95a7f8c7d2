"""The input size reaches the client families: FedCNN's flattened width, the traced layer inventory of FedFree's
server and clients, and the DataModule's reported size (32 px CIFAR / digits, 64 px Tiny-ImageNet)."""

from __future__ import annotations

import pytest
import torch

from lightning_methods.datamodules import FederatedDataModule
from lightning_methods.federated import FedFree
from lightning_methods.federated.algorithm import ClientInfo, FederationInfo, build_net
from lightning_methods.federated.partition import PartitionSettings
from lightning_methods.models.fed_clients import create_client_net
from lightning_methods.models.fed_cnn import FedCNN


def _flat_width(size: int) -> int:
    """64 channels x the side after two (5x5 valid conv, 2x2 max-pool) blocks."""
    for _ in range(2):
        size = (size - 5 + 1) // 2
    return 64 * size * size


def test_flat_width_matches_htfllib_dims():
    # HtFLlib's FedAvgCNN: dim=1600 on 32 px CIFAR, dim=10816 on 64 px Tiny-ImageNet
    assert (_flat_width(32), _flat_width(64)) == (1600, 10816)


@pytest.mark.parametrize("name", ["fed_cnn", "fedavg_cnn"])
@pytest.mark.parametrize("size", [32, 64])
def test_cnn_classifier_input_follows_input_size(name, size):
    net = create_client_net(name, 200, input_size=size)
    first = net.base.fc1[0]
    assert first.in_features == _flat_width(size)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 200) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["fed_cnn", "fedavg_cnn", "fed_resnet8", "fed_mobilenetv2"])
def test_families_run_on_64px(name):
    net = create_client_net(name, 200, input_size=64).eval()
    with torch.no_grad():
        feats = net.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 512)


def test_cnn_at_64px_rejects_32px_input():
    net = create_client_net("fed_cnn", 10, input_size=64).eval()
    with pytest.raises(RuntimeError):
        net(torch.randn(1, 3, 32, 32))


def test_32px_build_is_unchanged():
    """The default size builds exactly the former 32 px network (same parameters from the same seed)."""
    info = FederationInfo(num_clients=1, num_classes=10, families=["fed_cnn"])
    assert info.image_size == 32 and ClientInfo(0, "fed_cnn", 10, 5).image_size == 32
    net = build_net("fed_cnn", info, seed=3)
    torch.manual_seed(3)
    ref = FedCNN(10, hidden=(512,))
    head = torch.nn.Linear(512, 10)  # FedClientNet draws its head after the backbone (whose fc becomes the pool)
    state = net.state_dict()
    for key, value in ref.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[f"base.{key}"], value), key
    assert torch.equal(state["head.weight"], head.weight) and torch.equal(state["head.bias"], head.bias)


def test_fedfree_traces_layers_at_the_federation_image_size():
    algo = FedFree(k=2)
    algo.setup_server(
        FederationInfo(num_clients=2, num_classes=200, families=["fed_cnn", "fed_resnet8"], image_size=64)
    )
    conv1, conv2 = algo.global_specs[0], algo.global_specs[1]
    assert conv1.input_size == (64, 64) and conv2.input_size == ((64 - 4) // 2, (64 - 4) // 2)
    assert algo.global_specs[2].in_features == 10816
    info = ClientInfo(client_id=1, family="fed_resnet8", num_classes=200, num_examples=4, image_size=64)
    net = build_net("fed_resnet8", info, seed=0)
    specs = algo.client_specs(net, "fed_resnet8", info.image_size)
    assert specs[0].input_size == (64, 64)
    # the stride-2 stages of the CIFAR ResNet halve the traced size twice
    assert {s.input_size for s in specs if s.kind == "conv"} >= {(64, 64), (32, 32), (16, 16)}


def test_datamodule_image_size():
    part = PartitionSettings(num_clients=2, scheme="iid")
    assert FederatedDataModule("tinyimagenet", download=False, partition=part).image_size == 64
    assert FederatedDataModule("cifar10", download=False, partition=part).image_size == 32
    dm = FederatedDataModule("digits", partition=part)
    dm.setup()
    assert dm.image_size == dm.client_train[0].images.shape[-1] == 32
