"""The tunnel backbones: MLPs of configurable depth and width, VGG with the three-FC head (VGG-19 = 19 layers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_methods import ImageClassifier
from lightning_methods.models import available_backbones, create_backbone


def test_mlp_depth_width_and_presets(one_thread):
    m = create_backbone("mlp", 100, depth=7, width=48)
    assert sum(isinstance(x, nn.Linear) for x in m.modules()) == 7 and m.num_features == 48
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert {"mlp", "mlp6", "mlp8", "mlp10", "mlp12", "vgg19_3fc", "vgg11_3fc"} <= set(available_backbones())
    assert create_backbone("mlp12", 10).layers[0].linear.out_features == 1024
    assert create_backbone("mlp12", 10, width=64).layers[0].linear.out_features == 64
    bn = create_backbone("mlp", 10, depth=3, width=8, batch_norm=True)
    assert isinstance(bn.layers[0].norm, nn.BatchNorm1d)
    torch.manual_seed(0)
    deep = create_backbone("mlp", 10, depth=12, width=256, input_size=8).eval()
    x = torch.randn(64, 3, 8, 8)
    assert deep.forward_features(x).std() > 0.1 * x.std()  # He init keeps the signal of a deep ReLU MLP
    with pytest.raises(ValueError, match="depth >= 2"):
        create_backbone("mlp", 10, depth=1)
    with pytest.raises(ValueError, match="3072 values per sample"):
        create_backbone("mlp", 10, depth=2, width=4)(torch.randn(2, 3, 16, 16))


def test_vgg19_3fc_layout(one_thread):
    m = create_backbone("vgg19_3fc", 10)
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 16
    assert sum(isinstance(x, nn.Linear) for x in m.modules()) == 3
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = create_backbone("vgg19_3fc", 10, batch_norm=False, width=0.5)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in plain.modules())
    assert plain.features[0].conv.out_channels == 32 and plain.fc1.in_features == 256
    clf = ImageClassifier("vgg11_3fc", 10, backbone_kwargs={"width": 0.25, "fc_width": 32})
    assert clf.backbone.num_features == 32
    with pytest.raises(ValueError, match="32x32 inputs"):
        m(torch.randn(1, 3, 64, 64))
