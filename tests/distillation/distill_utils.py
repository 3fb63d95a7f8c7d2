"""Small shared pieces for the distillation tests: tiny dict-batch loaders, a fast Trainer, teacher files."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_methods.distillation import DistillationClassifier, distiller_class
from lightning_methods.optim import DeepKD

from helpers import quiet_trainer, write_teacher_file

NUM_CLASSES = 10
STUDENT, TEACHER = "resnet8", "resnet14"


class DictData(Dataset):
    """Seeded random normalized images with labels, as dict samples (the package's batch format)."""

    def __init__(self, n: int = 16, seed: int = 0, num_classes: int = NUM_CLASSES) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "target": self.y[i], "index": torch.tensor(i)}


def loader(n: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(DictData(n, seed), batch_size=batch_size, shuffle=False)


def trainer(**kwargs) -> Trainer:
    return quiet_trainer(**{"deterministic": True, **kwargs})


def write_teacher(directory: Path, arch: str = TEACHER, seed: int = 0, num_classes: int = NUM_CLASSES) -> Path:
    """A teacher of the small test pair in the shared CIFAR-100 teacher format (see ``helpers.write_teacher``)."""
    return write_teacher_file(directory, arch, num_classes, seed)


def make_module(teacher_file: Path | None, deepkd: bool = False, method: str = "dkd", lr: float = 0.05,
                seed: int = 0, **kwargs) -> DistillationClassifier:
    torch.manual_seed(seed)
    if deepkd:
        optimizer = partial(DeepKD, lr=lr, delta_ncg=0.05)
    else:
        optimizer = partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4)
    cls = distiller_class(method, deepkd)
    path = None if teacher_file is None else str(teacher_file)
    return cls(backbone=STUDENT, teacher=TEACHER, teacher_checkpoint=path, num_classes=NUM_CLASSES, optimizer=optimizer,
               log_teacher_accuracy=False, **kwargs)
