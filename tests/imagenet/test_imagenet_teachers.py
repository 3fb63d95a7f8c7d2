"""ImageNet distillation teachers: torchvision's weights API (the download monkeypatched: no network) and weights
files (loaded with weights_only=True), into the registry's torchvision-layout backbones."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision.models._api as tv_api

from lightning_methods.distillation.teacher import WEIGHTS_PREFIX, load_teacher, state_hash
from lightning_methods.models import create_backbone


def _state(name: str, seed: int, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_backbone(name, num_classes).state_dict()


@pytest.fixture
def fake_download(monkeypatch):
    """Replace torchvision's download with a function that records its call and returns a given state dict."""
    calls: list[dict] = []
    served: dict[str, dict[str, torch.Tensor]] = {}

    def load_state_dict_from_url(url, *args, **kwargs):
        calls.append({"url": url, **kwargs})
        if url not in served:
            raise urllib.error.URLError("no network in tests")
        return served[url]

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", load_state_dict_from_url)
    return calls, served


def test_weights_api_path_loads_the_served_weights(fake_download):
    calls, served = fake_download
    url = "https://download.pytorch.org/models/resnet34-b627a593.pth"  # torchvision's ResNet34_Weights.IMAGENET1K_V1
    served[url] = _state("imagenet_resnet34", seed=3)
    model, source = load_teacher("imagenet_resnet34", "torchvision:ResNet34_Weights.IMAGENET1K_V1", 1000)
    assert str(source) == "torchvision:ResNet34_Weights.IMAGENET1K_V1"
    assert [c["url"] for c in calls] == [url]
    assert calls[0]["weights_only"] is True and calls[0]["check_hash"] is True  # safe load, hash-checked download
    reference = create_backbone("imagenet_resnet34", 1000)
    reference.load_state_dict(served[url])
    assert state_hash(model) == state_hash(reference)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_weights_api_errors_name_the_fix(fake_download):
    calls, served = fake_download
    with pytest.raises(ValueError, match="unknown torchvision weights 'ResNet34_Weights.NOPE'"):
        load_teacher("imagenet_resnet34", "torchvision:ResNet34_Weights.NOPE", 1000)
    with pytest.raises(RuntimeError, match=r"resnet34-b627a593\.pth.*pass its path"):  # offline: the URL to fetch
        load_teacher("imagenet_resnet34", f"{WEIGHTS_PREFIX}ResNet34_Weights.IMAGENET1K_V1", 1000)
    # weights of another architecture: the strict load names the mismatch and the ImageNet way to get a teacher
    served["https://download.pytorch.org/models/resnet18-f37072fd.pth"] = _state("imagenet_resnet18", seed=0)
    with pytest.raises(ValueError, match="does not match the architecture 'imagenet_resnet34'.*torchvision:"):
        load_teacher("imagenet_resnet34", "torchvision:ResNet18_Weights.IMAGENET1K_V1", 1000)


@pytest.mark.parametrize("name", ["imagenet_resnet18", "imagenet_mobilenetv1"])
def test_teacher_file_in_torchvision_format_loads_offline(tmp_path, name):
    """A plain state dict as torchvision publishes its weights files (the offline route of the ImageNet configs)."""
    sd = _state(name, seed=5, num_classes=10)
    file = tmp_path / "weights.pth"
    torch.save(sd, file)
    model, source = load_teacher(name, file, 10)
    assert source == file
    reference = create_backbone(name, 10)
    reference.load_state_dict(sd)
    assert state_hash(model) == state_hash(reference)
    x = torch.randn(2, 3, 32, 32)
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_teacher_file_with_pickled_objects_is_refused(tmp_path):
    """weights_only=True: a file that needs unpickling of arbitrary objects is refused with the opt-in named."""
    file = tmp_path / "pickled.pth"
    torch.save({"model": _state("imagenet_resnet18", 0, 10), "extra": object()}, file)
    with pytest.raises(ValueError, match="teacher_allow_pickle"):
        load_teacher("imagenet_resnet18", file, 10)


def test_distillation_classifier_takes_a_torchvision_teacher(fake_download):
    from lightning_methods.distillation import DKDClassifier

    calls, served = fake_download
    served["https://download.pytorch.org/models/resnet34-b627a593.pth"] = _state("imagenet_resnet34", seed=1)
    module = DKDClassifier(
        backbone="imagenet_resnet18",
        teacher="imagenet_resnet34",
        teacher_checkpoint="torchvision:ResNet34_Weights.IMAGENET1K_V1",
        num_classes=1000,
        temperature=1.0,
        beta=0.5,
        warmup_epochs=1,
    )
    reference = create_backbone("imagenet_resnet34", 1000)
    reference.load_state_dict(served["https://download.pytorch.org/models/resnet34-b627a593.pth"])
    assert module.teacher_sha256 == state_hash(reference)
    assert module.teacher_path == "torchvision:ResNet34_Weights.IMAGENET1K_V1"
