"""WRN-50-2 with a CIFAR stem (the KOALA / KOALA++ CIFAR-100 backbone): torchvision's architecture except the stem."""

from __future__ import annotations

import torch
from torchvision.models import wide_resnet50_2

from lightning_methods.models import WideResNet50, create_backbone


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_count_and_names_match_torchvision_but_the_stem():
    with torch.device("meta"):  # no memory, no initialization cost
        ours = create_backbone("wrn_50_2", 100)
        ref = wide_resnet50_2(num_classes=100)
    stem_diff = 64 * 3 * (7 * 7 - 3 * 3)  # 7x7 ImageNet stem -> 3x3 CIFAR stem
    assert n_params(ours) == n_params(ref) - stem_diff == 67_031_460
    # and against torchvision's 1000-class model (68,883,240 parameters): the 100-class head is 1,844,100 smaller
    with torch.device("meta"):
        assert n_params(wide_resnet50_2()) - stem_diff - 2048 * 900 - 900 == n_params(ours)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    diff = [k for k in ref_sd if ours_sd[k].shape != ref_sd[k].shape]
    assert diff == ["conv1.weight"] and ours_sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert isinstance(ours.maxpool, torch.nn.Identity) and ours.num_features == 2048


def test_cifar_stem_keeps_the_resolution_and_the_outputs_have_the_right_shapes():
    torch.manual_seed(0)
    net = WideResNet50(num_classes=10, layers=(1, 1, 1, 1)).eval()  # same family, one block per stage
    sizes = {}
    net.layer1.register_forward_hook(lambda m, i, o: sizes.update(layer1=o.shape))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = net.forward_features(x), net(x)
    assert sizes["layer1"] == (2, 256, 32, 32)  # no stride-2 stem, no max-pool
    assert feats.shape == (2, 2048) and logits.shape == (2, 10)
    torch.testing.assert_close(net.fc(feats), logits)
    assert net.layer1[0].conv2.out_channels == 128  # bottleneck width x2 (ResNet-50: 64)
