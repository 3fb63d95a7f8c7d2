"""Per-step cost of each optimizer / method module against plain SGD on the same model (the `methods` section).

A method adds its case here: a name and a zero-argument function returning seconds per step from
``harness.time_trainer``. The first case is the baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from harness import Settings, classifier, data, time_trainer


def method_cases(s: Settings) -> list[tuple[str, Callable[[], float]]]:
    def opt_case(make_opt: Callable) -> Callable[[], float]:
        return lambda: time_trainer(s, classifier(s.backbone, optimizer=make_opt), data(s, gpu_resident=True))

    return [
        ("SGD (baseline)", opt_case(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4))),
        ("AdamW", opt_case(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=5e-4))),
    ]
