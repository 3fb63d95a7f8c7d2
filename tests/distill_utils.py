"""Small shared pieces for the distillation tests: tiny dict-batch loaders, a fast Trainer, teacher files."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_methods import DistillationModule
from lightning_methods.models import create_backbone
from lightning_methods.optim import DeepKD

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
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True)
    args.update(kwargs)
    return Trainer(**args)


def write_teacher(directory: Path, arch: str = TEACHER, seed: int = 0, num_classes: int = NUM_CLASSES) -> Path:
    """A teacher in the shared CIFAR-100 teacher format: <dir>/<arch>_vanilla/ckpt_epoch_240.pth = {"model": sd}."""
    torch.manual_seed(seed)
    model = create_backbone(arch, num_classes)
    with torch.no_grad():  # non-default BN statistics, so that a change would be visible
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1000)
    path = Path(directory) / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 240}, path)
    return path


def make_module(teacher_file: Path | None, deepkd: bool = False, method: str = "dkd", lr: float = 0.05,
                seed: int = 0, **kwargs) -> DistillationModule:
    torch.manual_seed(seed)
    if deepkd:
        optimizer = partial(DeepKD, lr=lr, delta_ncg=0.05)
    else:
        optimizer = partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4)
    return DistillationModule(STUDENT, TEACHER, None if teacher_file is None else str(teacher_file), method=method,
                              deepkd=deepkd, num_classes=NUM_CLASSES, optimizer=optimizer,
                              log_teacher_accuracy=False, **kwargs)
