"""The official HPN ResNet-32 backbone: weights and outputs equal the official models/cifar/resnet.py for a seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_methods.models import create_backbone
from lightning_methods.models.hpn_resnet import HPNResNet

# Official ResNet(32, output_dims=10) built after torch.manual_seed(5), cast to float64; input randn(2, 3, 32, 32) from
# a generator seeded 11 (float64).
OFFICIAL_PARAMS = 487386
OFFICIAL_FC_W0 = [-0.09863890707492828, 0.08787785470485687, 0.019017711281776428, 0.01715688407421112]
OFFICIAL_CONV1_SUM = -3.6063029788638232
OFFICIAL_EVAL_OUT = [
    [72.30834201485072, -29.29198998263027, 103.40967016418237, -70.21680242747713, 97.69747054309562,
     42.19993092902713, 1.5686511880276865, -81.32403086948891, -57.71780466785876, -39.33602746278126],
    [70.72453989023569, -31.566513173283468, 101.62000973940752, -67.60110984531268, 95.93301002430786,
     39.50386682382129, 2.1710673607676414, -77.62815565585001, -58.07264152566768, -39.93418601980624]]
OFFICIAL_TRAIN_OUT0 = [0.841709322283177, -0.17082518251436413, 1.179848356850542, 0.2557520681784035,
                       -0.3208698994523348, 0.003282030307779682, -0.4889699482575247, -0.7711465413900266,
                       -0.9025579678356829, -0.5203262909312445]


def test_matches_official_resnet32(one_thread):
    with torch.random.fork_rng():
        torch.manual_seed(5)
        net = create_backbone("hpn_resnet32", 10).double()
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_PARAMS
    assert net.layer2[0].downsample[0].weight.shape == (32, 16, 3, 3)  # the 3x3 stride-2 shortcut
    assert net.layer2[0].downsample[0].stride == (2, 2)
    torch.testing.assert_close(net.fc.weight[0, :4], torch.tensor(OFFICIAL_FC_W0, dtype=torch.float64), rtol=0, atol=0)
    w = net.conv1.weight.detach()  # a sum of 432 values: its order (SIMD width) moves it by <= n * eps64 * sum|w|
    eps = torch.finfo(torch.float64).eps
    assert float(w.sum()) == pytest.approx(OFFICIAL_CONV1_SUM, rel=0, abs=w.numel() * eps * float(w.abs().sum()))
    # one forward pass rounds about (sum of the fan-ins of its conv and linear layers) times along a path, on
    # BatchNorm-scaled values: relative bound fan-ins * eps64 (about 2.2e-12 for this ResNet-32)
    forward = sum(m.weight[0].numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))) * eps
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), torch.tensor(OFFICIAL_EVAL_OUT, dtype=torch.float64),
                                   rtol=forward, atol=0)
        out = net.train()(x)[0]
        torch.testing.assert_close(out, torch.tensor(OFFICIAL_TRAIN_OUT0, dtype=torch.float64),
                                   rtol=forward, atol=forward * float(out.abs().max()))


def test_shortcut_option_and_errors():
    net = HPNResNet(20, 7, shortcut="conv1x1")
    assert net.layer3[0].downsample[0].weight.shape == (64, 32, 1, 1)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 7)  # any input size (adaptive pooling)
    assert HPNResNet(8, 5, multiplier=2).fc.in_features == 128
    with pytest.raises(ValueError, match="6n \\+ 2"):
        HPNResNet(30)
    with pytest.raises(ValueError, match="shortcut must be"):
        HPNResNet(20, shortcut="identity")
