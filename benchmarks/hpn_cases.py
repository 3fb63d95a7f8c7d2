"""hpn section: the per-step cost of Hyperspherical Prototype Networks (Mettes et al., NeurIPS 2019, arXiv
1901.10514) against a softmax classifier on the same backbone, and the one-off cost of optimising prototypes.

Cases (baseline first; ratio = time / baseline):
- softmax cross-entropy ImageClassifier, 100 classes (baseline);
- HPNClassifier, 100 classes in D = 100 and D = 10 dimensions (squared-cosine loss summed over the batch, cosines to
  all prototypes as logits): the step differs only in the last layer's width and the loss;
- prototype optimisation, K = 100, D = 100 (official update), time per 1,000 SGD steps (a run uses 10,000, once
  before training; on the CPU whatever the training device).

Backbone: the official HPN ResNet-32 (``hpn_resnet32``) in cpu / full mode, ``hpn_resnet8`` in small mode.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from lightning_methods import ImageClassifier
from lightning_methods.hpn import HPNClassifier, optimize_prototypes

from harness import Settings, data, time_trainer


def _prototype_steps(steps: int) -> float:
    start = time.perf_counter()
    optimize_prototypes(100, 100, steps)
    return (time.perf_counter() - start) / steps * 1000


def cases(s: Settings) -> list[tuple]:
    small = s.n_train <= 256
    backbone = "hpn_resnet8" if small else "hpn_resnet32"
    sgd = partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4)

    def hpn(dims: int) -> HPNClassifier:
        return HPNClassifier(prototype_dims=dims, prototype_iterations=50 if small else 500, backbone=backbone,
                             num_classes=100, optimizer=sgd)

    steps = 100 if small else 2000
    return [
        (f"softmax ImageClassifier, {backbone} (baseline)",
         lambda: time_trainer(s, ImageClassifier(backbone, 100, optimizer=sgd), data(s))),
        (f"HPNClassifier D=100, {backbone}", lambda: time_trainer(s, hpn(100), data(s))),
        (f"HPNClassifier D=10, {backbone}", lambda: time_trainer(s, hpn(10), data(s))),
        ("prototype optimisation K=100 D=100, per 1,000 SGD steps", lambda: _prototype_steps(steps), 1),
    ]
