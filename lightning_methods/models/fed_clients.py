"""Client families of heterogeneous federated learning with a common 512-d feature + head interface.

HtFLlib (TsingZ0/HtFLlib, ``BaseHeadSplit``) splits every client model into ``base`` (images -> ``feature_dim`` =
512 features) and ``head`` (``Linear(512, num_classes)``): the backbone's classifier is replaced by a parameter-free
``AdaptiveAvgPool1d(512)`` over the feature axis (ResNet-50/101/152: 2048 -> 512, GoogLeNet 1024 -> 512, MobileNetV2
1280 -> 512), so prototype methods (FedProto, FedGH) can compare features of different architectures.
:class:`FedClientNet` is that split; ``forward_features`` returns the 512-d features, ``forward`` the logits.

Registered names (``create_backbone(name, num_classes, stem=..., feature_dim=...)``) and their parameter counts for
100 classes (CIFAR stem; FedFree's Table A1 values in brackets, from the spec):

=================== ====================================================== ===========
``fed_cnn``         FedCNN 2 conv + 3 FC (:mod:`.fed_cnn`)                  1.19M [3.2M]
``fedavg_cnn``      HtFLlib ``FedAvgCNN``, 2 conv + 2 FC                    0.92M
``fed_resnet18``    ResNet-18 (:mod:`.resnet`)                              11.22M [11.2M]
``fed_resnet34``    ResNet-34                                               21.33M [21.3M]
``fed_resnet50``    ResNet-50                                               23.55M [23.5M]
``fed_resnet101``   ResNet-101 (:mod:`.resnet_deep`)                        42.54M [42.5M]
``fed_resnet152``   ResNet-152                                              58.19M [58.2M]
``fed_googlenet``   GoogLeNet (:mod:`.googlenet`)                           5.53M [6.8M]
``fed_mobilenetv2`` MobileNetV2 width 1.0 (:mod:`.mobilenetv2_x1`)          2.28M [3.5M]
=================== ====================================================== ===========

``fed_resnet8`` / ``fed_resnet20`` (the 16-32-64-filter CIFAR ResNets of :mod:`.cifar_resnet`, 64-d features
pooled up to 512; 0.13M / 0.32M) are small families for CPU demos and tests; the CIFAR stem is their only stem.

The ResNet counts match the table; 3.5M is torchvision's MobileNetV2 *with* its 1000-class classifier (2.22M
without); no GoogLeNet layout in torchvision or HtFLlib has 6.8M (5.6M without the classifier, 13.0M with the
auxiliary heads); for the CNN see :mod:`.fed_cnn`. ``stem="imagenet"`` builds HtFLlib's exact models (torchvision
ResNets and GoogLeNet with their stride-4/8 ImageNet stems, MobileNetV2 with ImageNet strides) for parity runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from lightning_methods.models.cifar_resnet import CifarResNet
from lightning_methods.models.fed_cnn import FedCNN
from lightning_methods.models.googlenet import GoogLeNet
from lightning_methods.models.mobilenetv2_x1 import MobileNetV2X1
from lightning_methods.models.registry import register_backbone
from lightning_methods.models.resnet import BasicBlock, Bottleneck, ResNet

Stem = Literal["cifar", "imagenet"]

#: FedFree's / HtFLlib's ``HtFE-img-8`` family in HtFLlib's order (HtFLlib assigns ``models[client_id % 8]``).
HTFE_IMG8: tuple[str, ...] = ("fed_cnn", "fed_googlenet", "fed_mobilenetv2", "fed_resnet18", "fed_resnet34",
                              "fed_resnet50", "fed_resnet101", "fed_resnet152")

#: Parameter counts in millions stated by FedFree's Table A1 (via the spec), for the parameter-count test.
PAPER_PARAMS_M: dict[str, float] = {"fed_cnn": 3.2, "fed_resnet18": 11.2, "fed_resnet34": 21.3, "fed_resnet50": 23.5,
                                    "fed_resnet101": 42.5, "fed_resnet152": 58.2, "fed_googlenet": 6.8,
                                    "fed_mobilenetv2": 3.5}

_RESNET_BLOCKS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3]),
                  101: (Bottleneck, [3, 4, 23, 3]), 152: (Bottleneck, [3, 8, 36, 3])}


class FeaturePool(nn.Module):
    """HtFLlib's feature adapter: ``AdaptiveAvgPool1d(feature_dim)`` over the feature axis of (N, D) features."""

    def __init__(self, in_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.in_dim, self.feature_dim = in_dim, feature_dim
        self.pool = nn.AdaptiveAvgPool1d(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.in_dim == self.feature_dim else self.pool(x.unsqueeze(1)).squeeze(1)


class FedClientNet(nn.Module):
    """``base`` (backbone with its classifier replaced by :class:`FeaturePool`) followed by ``head``.

    Args:
        backbone: a network whose classifier lives in the attribute ``classifier_attr`` and whose ``forward`` ends
            with that classifier (as every backbone of this package and torchvision's ResNets/GoogLeNet do).
        classifier_attr: name of the classifier attribute (``"fc"``, ``"linear"``, ...); it becomes the pool.
        num_classes: size of the head.
        feature_dim: width of the shared feature space (512 in HtFLlib).
    """

    def __init__(self, backbone: nn.Module, classifier_attr: str, num_classes: int, feature_dim: int = 512) -> None:
        super().__init__()
        classifier = getattr(backbone, classifier_attr, None)
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"{type(backbone).__name__}.{classifier_attr} is not the Linear classifier "
                            f"(got {type(classifier).__name__}); pass the attribute that holds the classifier")
        setattr(backbone, classifier_attr, FeaturePool(classifier.in_features, feature_dim))
        self.base = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


def _resnet(depth: int, num_classes: int, stem: Stem) -> tuple[nn.Module, str]:
    if stem == "imagenet":
        import torchvision

        return getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes), "fc"
    block, layers = _RESNET_BLOCKS[depth]
    return ResNet(block, layers, num_classes), "linear"


#: Builders ``(num_classes, stem) -> (backbone, classifier attribute)``. Every family but the CNNs ends in global
#: average pooling and runs on any input size; the CNNs' flattened width depends on it (``create_client_net``).
_BUILDERS: dict[str, Callable[[int, Stem], tuple[nn.Module, str]]] = {
    "fed_cnn": lambda c, s: (FedCNN(c, hidden=(512,)), "fc"),
    "fedavg_cnn": lambda c, s: (FedCNN(c, hidden=()), "fc"),
    "fed_googlenet": lambda c, s: (GoogLeNet(c, stem=s), "fc"),
    "fed_mobilenetv2": lambda c, s: (MobileNetV2X1(c, stem=s), "fc"),
    **{f"fed_resnet{d}": partial(lambda d, c, s: _resnet(d, c, s), d) for d in _RESNET_BLOCKS},
    # small CIFAR ResNets (16-32-64 filters, :mod:`.cifar_resnet`) for quick CPU runs (digits demo, tests)
    "fed_resnet8": lambda c, s: (CifarResNet(8, (16, 16, 32, 64), c), "fc"),
    "fed_resnet20": lambda c, s: (CifarResNet(20, (16, 16, 32, 64), c), "fc"),
}


def client_families() -> list[str]:
    """Names of the registered client families."""
    return sorted(_BUILDERS)


def create_client_net(name: str, num_classes: int, feature_dim: int = 512, stem: Stem = "cifar",
                      input_size: int = 32, **kwargs: Any) -> FedClientNet:
    """Build a client family by name (see the module docstring).

    Args:
        name: one of the ``fed_*`` names above.
        num_classes: size of the head.
        feature_dim: width of the shared feature space.
        stem: ``"cifar"`` (stride-1 3x3 stems) or ``"imagenet"`` (HtFLlib's torchvision models).
        input_size: input height = width (32 for CIFAR, 64 for Tiny-ImageNet). Only the CNNs depend on it: their
            flattened width is ``64 * s * s`` with ``s = ((input_size - 4) // 2 - 4) // 2`` (1600 at 32 px, 10816 at
            64 px, HtFLlib's ``FedAvgCNN`` ``dim`` values); the other families end in global average pooling.
        **kwargs: for ``fed_cnn`` / ``fedavg_cnn`` only, FedCNN arguments (``hidden``, ``channels``, ...).

    Raises:
        ValueError: for an unknown name or stem.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown client family {name!r}; known: {', '.join(client_families())}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    if kwargs and not name.endswith("cnn"):
        raise ValueError(f"{name} takes no extra arguments, got {sorted(kwargs)}")
    if name.endswith("cnn"):
        kwargs.setdefault("hidden", (512,) if name == "fed_cnn" else ())
        backbone, attr = FedCNN(num_classes, input_size=input_size, **kwargs), "fc"
    else:
        backbone, attr = _BUILDERS[name](num_classes, stem)
    return FedClientNet(backbone, attr, num_classes, feature_dim)


for _name in _BUILDERS:
    register_backbone(_name, partial(create_client_net, _name))
