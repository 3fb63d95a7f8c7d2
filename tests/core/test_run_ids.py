"""The W&B run ids the package makes survive the YAML files and command lines that jsonargparse reads back. A 12-digit
hex id such as ``465101263e65`` (digits and one ``e``: about one id in 280) came back from a grid's ``run.yaml`` as a
number, quoted or not (jsonargparse reads a logger's init_args so), and stopped the run: the ids now start with a
letter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lightning_methods.results import grid
from lightning_methods.runs import StagedRun

REPO = Path(__file__).resolve().parents[2]
#: What a YAML 1.2 loader may read as a number: digits with an exponent and / or a dot, hex, octal.
NUMBER_LIKE = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d+)([eE][-+]?\d+)?|0[xXoO][0-9a-fA-F_]+")


def test_staged_run_ids_start_with_a_letter_and_are_unique(tmp_path):
    with StagedRun(tmp_path / "run", "t", {"config": "c"}) as run:
        ids = [run.wandb_id(f"s{i}") for i in range(300)]
        assert run.wandb_id("s7") == ids[7]  # kept: a resumed stage logs into the same W&B run
    assert all(i[0].isalpha() and len(i) == 12 and re.fullmatch(r"[a-z0-9]+", i) for i in ids)
    assert not any(NUMBER_LIKE.fullmatch(i) for i in ids) and len(set(ids)) == 300


def test_a_grid_run_file_parses_back_with_its_id(tmp_path, monkeypatch, capsys):
    """A grid's run.yaml is read back by ``fit`` with the W&B id kept in the grid's state."""
    from lightning_methods.cli import main

    def printed_id(grid_dir: Path) -> tuple[object, str]:
        grid.main(["--config", str(REPO / "configs/quickstart.yaml"), "--seeds", "0", "--grid_dir", str(grid_dir),
                   "--mode", "commands"])
        state = yaml.safe_load((grid_dir / "quickstart/state.json").read_text())
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", str(grid_dir / "quickstart/seed0/run.yaml"), "--print_config"])
        assert done.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        return printed["trainer"]["logger"]["init_args"]["id"], state["wandb_ids"]["seed0"]

    monkeypatch.chdir(tmp_path)
    got, kept = printed_id(tmp_path / "g")
    assert got == kept and kept[0].isalpha()
