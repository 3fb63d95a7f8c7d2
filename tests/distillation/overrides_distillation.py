"""tests/test_configs.py hook for configs/distillation/: distillation configs get a teacher checkpoint of the config's
teacher architecture, written in the shared CIFAR-100 teacher format ({"model": state_dict}); teacher configs
(configs/distillation/teachers/) are plain ImageClassifier fits and need nothing."""

from __future__ import annotations

from pathlib import Path

import yaml

from config_overrides import note_swap, register
from helpers import write_teacher_file

_WRITTEN: dict[tuple[str, int], Path] = {}  # one file per architecture and test session


#: keeps the ~50 smoke fits cheap: batches of 2 (BatchNorm still sees 2 samples) for the real zoo backbones
FAST = ["--data.init_args.batch_size=2"]


@register("distillation/")
def distillation_args(config_path: Path, tmp_path: Path, data_root: Path) -> list[str]:
    cfg = yaml.safe_load(config_path.read_text())
    init = (cfg.get("model") or {}).get("init_args") or {}
    teacher = init.get("teacher")
    note_swap(f"distillation/{config_path.name}", "batch_size -> 2")
    if teacher is None:  # teachers/*.yaml
        return FAST
    classes = 10 if cfg["data"]["class_path"].endswith("DigitsDataModule") else 100  # the digits demo: 10 classes
    key = (teacher, classes)
    if key not in _WRITTEN or not _WRITTEN[key].is_file():
        _WRITTEN[key] = write_teacher_file(tmp_path, teacher, classes)
    # the teacher's validation accuracy is tested in tests/test_distill_module.py; skip its extra forward here
    return [f"--model.init_args.teacher_checkpoint={_WRITTEN[key]}", "--model.init_args.log_teacher_accuracy=false",
            *FAST]
