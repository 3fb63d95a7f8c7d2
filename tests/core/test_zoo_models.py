"""The CIFAR-100 distillation zoo has mdistiller's parameter names, shapes and counts, so the shared teacher files
({"model": state_dict}) load with strict=True.

The reference layouts below are written independently from the mdistiller conventions (not by instantiating the
package's models); the exact parameter counts were taken from mdistiller's model code (megvii-research/mdistiller,
mdistiller/models/cifar) for 100 classes.
"""

from __future__ import annotations

import pytest
import torch

from lightning_methods.distillation.teacher import load_teacher
from lightning_methods.models import create_backbone

NUM_CLASSES = 100

#: parameter counts of mdistiller's models (100 classes); the KD literature rounds them (e.g. MobileNetV2 0.81M,
#: ShuffleV1 0.95M, ShuffleV2 1.36M, resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M).
PARAM_COUNTS = {
    "resnet8": 83892, "resnet14": 181108, "resnet20": 278324, "resnet32": 472756, "resnet44": 667188,
    "resnet56": 861620, "resnet110": 1736564, "resnet8x4": 1233540, "resnet32x4": 7433860, "ResNet18": 11220132,
    "ResNet50": 23705252, "wrn_16_1": 180916, "wrn_16_2": 703284, "wrn_40_1": 569780, "wrn_40_2": 2255156,
    "vgg8": 3965028, "vgg11": 9277284, "vgg13": 9462180, "vgg16": 14774436, "vgg19": 20086692,
    "MobileNetV2": 812836, "ShuffleV1": 949258, "ShuffleV2": 1355528,
}
PUBLISHED_M = {"MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36, "resnet8x4": 1.23, "resnet32x4": 7.43,
               "wrn_40_2": 2.26, "wrn_16_2": 0.70, "resnet56": 0.86, "resnet20": 0.28, "vgg13": 9.46}


# ------------------------------------------------------------------------------------------ reference layouts
def _bn(p: str, c: int) -> list:
    return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,)), (f"{p}.running_mean", (c,)), (f"{p}.running_var", (c,)),
            (f"{p}.num_batches_tracked", ())]


def _conv(p: str, out: int, inp: int, k: int, bias: bool = False) -> list:
    return [(f"{p}.weight", (out, inp, k, k))] + ([(f"{p}.bias", (out,))] if bias else [])


def _fc(p: str, inp: int) -> list:
    return [(f"{p}.weight", (NUM_CLASSES, inp)), (f"{p}.bias", (NUM_CLASSES,))]


def ref_cifar_resnet(depth: int, f: tuple[int, int, int, int]) -> list:
    n, keys, inp = (depth - 2) // 6, _conv("conv1", f[0], 3, 3) + _bn("bn1", f[0]), f[0]
    for s, (planes, stride) in enumerate(zip(f[1:], (1, 2, 2)), 1):
        for i in range(n):
            p = f"layer{s}.{i}"
            keys += _conv(f"{p}.conv1", planes, inp, 3) + _bn(f"{p}.bn1", planes)
            keys += _conv(f"{p}.conv2", planes, planes, 3) + _bn(f"{p}.bn2", planes)
            if i == 0 and (stride != 1 or inp != planes):
                keys += _conv(f"{p}.downsample.0", planes, inp, 1) + _bn(f"{p}.downsample.1", planes)
            inp = planes
    return keys + _fc("fc", f[3])


def ref_resnet_v2(blocks: list[int], bottleneck: bool) -> list:
    exp, keys, inp = 4 if bottleneck else 1, _conv("conv1", 64, 3, 3) + _bn("bn1", 64), 64
    for s, (planes, stride, n) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), blocks), 1):
        for i in range(n):
            p = f"layer{s}.{i}"
            if bottleneck:
                keys += _conv(f"{p}.conv1", planes, inp, 1) + _bn(f"{p}.bn1", planes)
                keys += _conv(f"{p}.conv2", planes, planes, 3) + _bn(f"{p}.bn2", planes)
                keys += _conv(f"{p}.conv3", planes * 4, planes, 1) + _bn(f"{p}.bn3", planes * 4)
            else:
                keys += _conv(f"{p}.conv1", planes, inp, 3) + _bn(f"{p}.bn1", planes)
                keys += _conv(f"{p}.conv2", planes, planes, 3) + _bn(f"{p}.bn2", planes)
            if (stride if i == 0 else 1) != 1 or inp != planes * exp:
                keys += _conv(f"{p}.shortcut.0", planes * exp, inp, 1) + _bn(f"{p}.shortcut.1", planes * exp)
            inp = planes * exp
    return keys + _fc("linear", 512 * exp)


def ref_wrn(depth: int, k: int) -> list:
    n, ch = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
    keys = _conv("conv1", 16, 3, 3)
    for b in (1, 2, 3):
        for i in range(n):
            inp, out, p = ch[b - 1] if i == 0 else ch[b], ch[b], f"block{b}.layer.{i}"
            keys += _bn(f"{p}.bn1", inp) + _conv(f"{p}.conv1", out, inp, 3) + _bn(f"{p}.bn2", out)
            keys += _conv(f"{p}.conv2", out, out, 3) + (_conv(f"{p}.convShortcut", out, inp, 1) if inp != out else [])
    return keys + _bn("bn1", ch[3]) + _fc("fc", ch[3])


def ref_vgg(cfg: list[list[int]]) -> list:
    keys, inp = [], 3
    for b, widths in enumerate(cfg):
        for j, w in enumerate(widths):
            keys += _conv(f"block{b}.{3 * j}", w, inp, 3, bias=True) + _bn(f"block{b}.{3 * j + 1}", w)
            inp = w
    return keys + _fc("classifier", 512)


def ref_mobile_half() -> list:
    keys, inp = _conv("conv1.0", 16, 3, 3) + _bn("conv1.1", 16), 16
    for s, (t, c, n) in enumerate([(1, 8, 1), (6, 12, 2), (6, 16, 3), (6, 32, 4), (6, 48, 3), (6, 80, 3), (6, 160, 1)]):
        for j in range(n):
            p, hid = f"blocks.{s}.{j}.conv", inp * t
            keys += _conv(f"{p}.0", hid, inp, 1) + _bn(f"{p}.1", hid) + _conv(f"{p}.3", hid, 1, 3) + _bn(f"{p}.4", hid)
            keys += _conv(f"{p}.6", c, hid, 1) + _bn(f"{p}.7", c)
            inp = c
    return keys + _conv("conv2.0", 1280, 160, 1) + _bn("conv2.1", 1280) + _fc("classifier.0", 1280)


def ref_shufflev1() -> list:
    keys, inp = _conv("conv1", 24, 3, 1) + _bn("bn1", 24), 24
    for s, (planes, n) in enumerate(zip((240, 480, 960), (4, 8, 4)), 1):
        for i in range(n):
            out = planes - inp if i == 0 else planes
            mid, g, p = out // 4, 1 if inp == 24 else 3, f"layer{s}.{i}"
            keys += _conv(f"{p}.conv1", mid, inp // g, 1) + _bn(f"{p}.bn1", mid) + _conv(f"{p}.conv2", mid, 1, 3)
            keys += _bn(f"{p}.bn2", mid) + _conv(f"{p}.conv3", out, mid // 3, 1) + _bn(f"{p}.bn3", out)
            inp = planes
    return keys + _fc("linear", 960)


def ref_shufflev2() -> list:
    keys, inp = _conv("conv1", 24, 3, 1) + _bn("bn1", 24), 24
    for s, (out, n) in enumerate(zip((116, 232, 464), (3, 7, 3)), 1):
        p, mid = f"layer{s}.0", out // 2
        keys += _conv(f"{p}.conv1", inp, 1, 3) + _bn(f"{p}.bn1", inp) + _conv(f"{p}.conv2", mid, inp, 1)
        keys += _bn(f"{p}.bn2", mid) + _conv(f"{p}.conv3", mid, inp, 1) + _bn(f"{p}.bn3", mid)
        keys += _conv(f"{p}.conv4", mid, 1, 3) + _bn(f"{p}.bn4", mid) + _conv(f"{p}.conv5", mid, mid, 1)
        keys += _bn(f"{p}.bn5", mid)
        for i in range(1, n + 1):
            p = f"layer{s}.{i}"
            for j, k in ((1, 1), (2, 3), (3, 1)):
                keys += _conv(f"{p}.conv{j}", mid, 1 if k == 3 else mid, k) + _bn(f"{p}.bn{j}", mid)
        inp = out
    return keys + _conv("conv2", 1024, 464, 1) + _bn("bn2", 1024) + _fc("linear", 1024)


VGG = {"vgg8": [[64], [128], [256], [512], [512]], "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
       "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
       "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
       "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]}
REFERENCE = {
    **{f"resnet{d}": (lambda d=d: ref_cifar_resnet(d, (16, 16, 32, 64))) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda: ref_cifar_resnet(8, (32, 64, 128, 256)),
    "resnet32x4": lambda: ref_cifar_resnet(32, (32, 64, 128, 256)),
    "ResNet18": lambda: ref_resnet_v2([2, 2, 2, 2], False), "ResNet50": lambda: ref_resnet_v2([3, 4, 6, 3], True),
    **{f"wrn_{d}_{k}": (lambda d=d, k=k: ref_wrn(d, k)) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{name: (lambda cfg=cfg: ref_vgg(cfg)) for name, cfg in VGG.items()},
    "MobileNetV2": ref_mobile_half, "ShuffleV1": ref_shufflev1, "ShuffleV2": ref_shufflev2,
}


def _layout(model: torch.nn.Module) -> list:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_zoo_layout_and_parameter_count(name):
    with torch.device("meta"):  # no memory, no init cost: names, shapes and counts only
        model = create_backbone(name, NUM_CLASSES)
    assert _layout(model) == REFERENCE[name]()
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    if name in PUBLISHED_M:
        assert round(PARAM_COUNTS[name] / 1e6, 2) == PUBLISHED_M[name]


def test_hand_written_resnet8_keys():
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    for layer, down in (("layer1.0", False), ("layer2.0", True), ("layer3.0", True)):
        for sub in ("1", "2"):
            keys += [f"{layer}.conv{sub}.weight"] + [f"{layer}.bn{sub}.{s}" for s in bn]
        if down:
            keys += [f"{layer}.downsample.0.weight"] + [f"{layer}.downsample.1.{s}" for s in bn]
    keys += ["fc.weight", "fc.bias"]
    sd = create_backbone("resnet8", NUM_CLASSES).state_dict()
    assert list(sd) == keys
    assert sd["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert sd["fc.weight"].shape == (100, 64)


def test_hand_written_student_spot_checks():
    mv2 = create_backbone("MobileNetV2", NUM_CLASSES).state_dict()
    assert mv2["conv1.0.weight"].shape == (16, 3, 3, 3)
    assert mv2["blocks.1.0.conv.3.weight"].shape == (48, 1, 3, 3)  # depthwise, 8 * 6 channels
    assert mv2["blocks.6.0.conv.6.weight"].shape == (160, 480, 1, 1)
    assert mv2["classifier.0.weight"].shape == (100, 1280)
    s1 = create_backbone("ShuffleV1", NUM_CLASSES).state_dict()
    assert s1["layer1.0.conv1.weight"].shape == (54, 24, 1, 1)  # ungrouped first 1x1 (24 input channels)
    assert s1["layer1.0.conv3.weight"].shape == (216, 18, 1, 1)  # 3 groups; 240 - 24 concatenated channels
    assert s1["layer3.3.conv3.weight"].shape == (960, 80, 1, 1)
    s2 = create_backbone("ShuffleV2", NUM_CLASSES).state_dict()
    assert s2["layer1.0.conv1.weight"].shape == (24, 1, 3, 3)
    assert s2["layer2.7.conv3.weight"].shape == (116, 116, 1, 1)
    assert s2["conv2.weight"].shape == (1024, 464, 1, 1)


@pytest.mark.parametrize("name", ["MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_new_students_forward(name):
    torch.manual_seed(0)
    model = create_backbone(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features)
    assert torch.allclose(out, model.linear(feats) if hasattr(model, "linear") else model.classifier(feats))


def test_names_are_case_insensitive():
    for a, b in (("MobileNetV2", "mobile_half"), ("shufflev1", "SHUFFLEV1"), ("ResNet50", "resnet50")):
        with torch.device("meta"):
            assert _layout(create_backbone(a, NUM_CLASSES)) == _layout(create_backbone(b, NUM_CLASSES))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_shared_teacher_file_loads_strictly(name, tmp_path):
    """A file in the shared format, built from a state dict with mdistiller's names, loads with strict=True and gives
    the same function."""
    torch.manual_seed(1)
    src = create_backbone(name, NUM_CLASSES)
    with torch.no_grad():  # non-trivial BN statistics so that eval-mode outputs depend on them
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path / "cifar_teachers" / f"{name}_vanilla"
    folder.mkdir(parents=True)
    torch.save({"model": src.state_dict(), "epoch": 240, "best_acc": 70.0}, folder / "ckpt_epoch_240.pth")
    model, file = load_teacher(name, tmp_path / "cifar_teachers", NUM_CLASSES)
    assert file == folder / "ckpt_epoch_240.pth"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), src.eval()(x))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
