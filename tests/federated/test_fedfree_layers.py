"""FedFree's layer inventory, Eq. 2 (per-layer change and top-k critical layers) and the depth mapping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_methods.federated.layers import (
    LayerSpec,
    layer_deltas,
    layer_params,
    layer_specs,
    map_layer_index,
    map_to_global,
    select_critical_layers,
    specs_from_json,
    specs_to_json,
)
from lightning_methods.models.fed_clients import create_client_net


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.fc1 = nn.Linear(4 * 8 * 8, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.bn(self.conv(x)))
        return self.fc2(self.fc1(x.flatten(1)))


def test_layer_specs_inventory_and_traced_sizes():
    specs = layer_specs(Mixed(), (3, 16, 16))
    assert [s.name for s in specs] == ["conv", "dw", "fc1", "fc2"]  # BatchNorm is not a layer
    conv, dw, fc1, fc2 = specs
    assert (conv.kind, conv.index, conv.count, conv.input_size, conv.stride, conv.padding) == (
        "conv", 0, 2, (16, 16), (2, 2), (1, 1))
    assert (dw.groups, dw.bias, dw.input_size, dw.index) == (4, False, (8, 8), 1)
    assert (fc1.kind, fc1.in_features, fc1.out_features, fc1.index, fc1.count, fc1.input_size) == (
        "linear", 256, 6, 0, 2, None)
    assert specs_from_json(specs_to_json(specs)) == specs


def test_global_cnn_layers_and_native_sizes():
    specs = layer_specs(create_client_net("fed_cnn", 10))
    assert [(s.kind, s.in_features, s.out_features) for s in specs] == [
        ("conv", 3, 32), ("conv", 32, 64), ("linear", 1600, 512), ("linear", 512, 512), ("linear", 512, 10)]
    assert specs[0].input_size == (32, 32) and specs[1].input_size == (14, 14)


def test_layer_deltas_are_l2_norms_of_weight_and_bias_changes():
    net = Mixed()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    after = {k: v.clone() for k, v in before.items()}
    after["conv.weight"] += 0.5  # 4*3*3*3 = 108 entries
    after["conv.bias"][0] -= 2.0
    after["fc2.weight"][1, 1] += 3.0
    specs = layer_specs(net, (3, 16, 16))
    deltas = layer_deltas(before, after, specs)
    assert deltas.tolist() == pytest.approx([math.sqrt(108 * 0.25 + 4.0), 0.0, 0.0, 3.0])
    by_count = layer_deltas(before, after, specs, "count")
    assert by_count[0] == pytest.approx(math.sqrt(31.0) / 112) and by_count[3] == pytest.approx(3.0 / 14)
    assert layer_deltas(before, after, specs, "sqrt_count")[3] == pytest.approx(3.0 / math.sqrt(14))
    with pytest.raises(ValueError, match="delta normalization"):
        layer_deltas(before, after, specs, "l1")


def test_select_critical_layers_top_k_with_ties_by_order():
    specs = layer_specs(Mixed(), (3, 16, 16))
    deltas = torch.tensor([1.0, 5.0, 5.0, 3.0], dtype=torch.float64)
    assert [s.name for s in select_critical_layers(deltas, specs, 2)] == ["dw", "fc1"]
    assert [s.name for s in select_critical_layers(deltas, specs, 3)] == ["dw", "fc1", "fc2"]
    ties = torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    assert [s.name for s in select_critical_layers(ties, specs, 2)] == ["conv", "dw"]
    for k in range(1, 5):
        assert len(select_critical_layers(deltas, specs, k)) == k
    with pytest.raises(ValueError, match="k=5 critical layers requested but the model has 4"):
        select_critical_layers(deltas, specs, 5)


@pytest.mark.parametrize("num_local,num_global", [(155, 2), (5, 3), (3, 5), (2, 2), (20, 3)])
def test_layer_mapping_endpoints_and_monotone(num_local, num_global):
    js = [map_layer_index(l, num_local, num_global) for l in range(num_local)]
    assert js[0] == 0 and js[-1] == num_global - 1
    assert all(a <= b for a, b in zip(js, js[1:]))
    assert set(js) <= set(range(num_global))


def test_layer_mapping_values_round_half_up():
    assert [map_layer_index(l, 5, 3) for l in range(5)] == [0, 1, 1, 2, 2]  # 0, .5, 1, 1.5, 2 -> half up
    assert map_layer_index(0, 1, 4) == 3  # a lone layer (a client's only Linear: its classifier) -> the last
    with pytest.raises(ValueError):
        map_layer_index(3, 3, 2)


def test_map_to_global_by_kind_and_depth():
    global_specs = layer_specs(create_client_net("fed_cnn", 10))
    client = layer_specs(create_client_net("fed_resnet8", 10))
    convs = [s for s in client if s.kind == "conv"]
    assert map_to_global(convs[0], global_specs).name == "base.conv1.0"
    assert map_to_global(convs[-1], global_specs).name == "base.conv2.0"
    head = next(s for s in client if s.name == "head")
    assert map_to_global(head, global_specs).name == "head"
    with pytest.raises(ValueError, match="no conv layer"):
        map_to_global(convs[0], [s for s in global_specs if s.kind == "linear"])


def test_layer_params_without_bias():
    spec = LayerSpec(name="dw", kind="conv", index=0, count=1, in_features=4, out_features=4, bias=False)
    state = {"dw.weight": torch.ones(4, 1, 3, 3)}
    assert set(layer_params(state, spec)) == {"weight"}
