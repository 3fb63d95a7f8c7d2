"""The distillation digits demo as scripts/demos/run_demos.sh runs it, on one epoch of two batches: the teacher's grid
leaves its last.ckpt where the script looks for it, the students keep the teacher's split (``--seed_keys
seed_everything``) and distil from exactly that teacher, and ``table --paired`` pairs each student with the student
alone of the same seed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from lightning_methods.distillation.base import CKPT_KEY
from lightning_methods.distillation.teacher import load_teacher, state_hash
from lightning_methods.results import grid, table

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "distillation"
SHORT = ["--", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--trainer.limit_test_batches=1", "--trainer.logger=false"]


def _script_teacher_path() -> str:
    """The teacher checkpoint the demo script passes, relative to the teacher's grid directory (and a check that both
    student grids of the script keep the data seed, as the runs below do)."""
    script = (REPO / "scripts" / "demos" / "run_demos.sh").read_text()
    demo = script[script.index("demo_distillation() {"):]
    demo = demo[: demo.index("\n}\n")]
    assert demo.count("--seed_keys seed_everything") == 2, "run_demos.sh: a distillation student grid varies the split"
    found = re.search(r'local teacher="\$OUT/distillation/teacher/([^"]+)"', demo)
    assert found, "run_demos.sh: the distillation demo's teacher path moved"
    return found.group(1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_demo_chain_distils_from_the_teacher_its_grid_trained(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    grid.main(["--config", str(CONFIGS / "digits_teacher.yaml"), "--seeds", "0", "--grid_dir", str(tmp_path / "t"),
               *SHORT])
    teacher = tmp_path / "t" / _script_teacher_path()
    assert teacher.is_file()
    for name, extra in (("student", []), ("kd", [f"--model.init_args.teacher_checkpoint={teacher}"])):
        grid.main(["--config", str(CONFIGS / f"digits_{name}.yaml"), "--seeds", "0", "1", "--seed_keys",
                   "seed_everything", "--grid_dir", str(tmp_path / name), *SHORT, *extra])

    digest = state_hash(load_teacher("resnet20", teacher, num_classes=10)[0])  # the hash the module records
    teacher_val = json.loads((tmp_path / "t" / "digits_teacher" / "seed0" / "results.json").read_text())["metrics"]
    for seed in (0, 1):
        run = tmp_path / "kd" / "digits_kd" / f"seed{seed}"
        resolved = yaml.safe_load((run / "run.yaml").read_text())
        assert resolved["seed_everything"] == seed and resolved["data"]["init_args"]["seed"] == 0  # the teacher's split
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt[CKPT_KEY]["path"] == str(teacher) and ckpt[CKPT_KEY]["sha256"] == digest
        # the loaded teacher scores the first validation batch exactly as the teacher's own run did
        record = json.loads((run / "results.json").read_text())["metrics"]
        assert record["last/val/teacher_acc"] == teacher_val["last/val/acc"]

    result = table.main([str(tmp_path / "student"), str(tmp_path / "kd"), "--metrics", "test/acc", "--no_plot",
                         "--baseline", "digits_student", "--paired"])
    assert {r.label for r in result.rows} == {"digits_student", "digits_kd"}
    (versus,) = result.comparisons
    assert versus.row == "digits_kd" and versus.paired and len(versus.values) == len(versus.baseline_values) == 2
