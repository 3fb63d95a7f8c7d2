"""Probe points: counts per backbone, forward order, the post-nonlinearity convention, overrides and bad names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.analysis.features import ProbePoint, extract_features, feature_dims
from lightning_methods.models import create_backbone
from lightning_methods.tunnel import probe_points
from lightning_methods.tunnel.points import call_order


def forward_order(model: nn.Module, points: list[ProbePoint]) -> list[str]:
    """Module names in the order a forward pass runs them (hooks on every probed module)."""
    named = dict(model.named_modules())
    return call_order(model, torch.zeros(1, 3, 32, 32), {p.module: named[p.module] for p in points})


@pytest.mark.parametrize("name, count, convs", [("vgg19_3fc", 19, 16), ("resnet34", 34, 33), ("resnet18", 18, 17),
                                                ("resnet20", 20, 19), ("vgg19", 17, 16), ("mlp10", 10, 0)])
def test_counts_and_forward_order(name, count, convs, one_thread):
    model = create_backbone(name, 10)
    points = probe_points(model)
    assert len(points) == count
    assert [p.module for p in points] == forward_order(model, points)
    assert len(probe_points(model, include_head=False)) == count - 1
    main_path_convs = [n for n, m in model.named_modules()
                       if isinstance(m, nn.Conv2d) and "shortcut" not in n and "downsample" not in n]
    assert len(main_path_convs) == convs  # one probe point per conv layer (+ the FC layers)


def test_resnet34_points_are_post_activation_block_outputs(one_thread):
    model = create_backbone("resnet34", 10).eval()
    points = probe_points(model)
    by_name = {p.name: p for p in points}
    assert by_name["stem_conv"] == ProbePoint("stem_conv", "bn1", "relu")
    assert by_name["s1b0_conv1"] == ProbePoint("s1b0_conv1", "layer1.0.bn1", "relu")
    assert by_name["s4b2_conv2"] == ProbePoint("s4b2_conv2", "layer4.2", None)  # closes the block: residual + ReLU
    x = torch.randn(2, 3, 32, 32)
    fs = extract_features(model, [by_name["stem_conv"], by_name["s1b0_conv2"]],
                          [{"image": x, "target": torch.zeros(2, dtype=torch.long), "index": torch.arange(2)}], 2)
    with torch.no_grad():
        stem = F.relu(model.bn1(model.conv1(x)))
        block = model.layer1[0](stem)
    torch.testing.assert_close(fs.features["stem_conv"], stem.flatten(1))
    torch.testing.assert_close(fs.features["s1b0_conv2"], block.flatten(1))
    assert fs.features["stem_conv"].min() >= 0  # read after the nonlinearity


def test_generic_rule_reads_after_the_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 32 * 32, 8), nn.GELU(), nn.Linear(8, 3))
    points = probe_points(model)
    assert [(p.name, p.module) for p in points] == [("conv1", "2"), ("fc1", "5"), ("fc2", "6")]


def test_overrides_and_bad_names(one_thread):
    model = create_backbone("vgg19", 10)
    points = probe_points(model, ["block1.1", "block0.0:relu", "classifier"])
    assert [p.name for p in points] == ["block0.0:relu", "block1.1", "classifier"]  # sorted into forward order
    assert points[0] == ProbePoint("block0.0:relu", "block0.0", "relu")
    with pytest.raises(ValueError, match=r"no module named 'block0\.9'\. Close matches: block4\.9"):
        probe_points(model, ["block0.9"])
    with pytest.raises(ValueError, match="activation after ':'"):
        probe_points(model, ["block0.0:tanhh"])

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(3 * 32 * 32, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x.flatten(1))

    with pytest.raises(ValueError, match=r"\['spare'\] are never run"):
        probe_points(Unused(), ["used", "spare"])


def test_module_run_twice_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(3 * 32 * 32, 8), nn.Linear(8, 4), nn.ReLU()

        def forward(self, x):
            return self.fc2(self.act(self.act(self.fc1(x.flatten(1)))))

    with pytest.raises(RuntimeError, match="'act' runs more than once per forward pass"):
        feature_dims(Shared(), [ProbePoint("act", "act")], torch.zeros(2, 3, 32, 32))
