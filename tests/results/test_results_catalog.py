"""`lightning-methods list`: every shipped config and every registered backbone, methods from the README table,
DataModules; `lightning-methods --help` points to it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lightning_methods import available_backbones
from lightning_methods import datamodules as dm
from lightning_methods.cli import main as cli_main
from lightning_methods.results import catalog

REPO = Path(__file__).resolve().parents[2]


def test_list_names_every_config_backbone_and_datamodule(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    cli_main(["list"])
    out = capsys.readouterr().out
    configs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    assert configs and [c for c in configs if f"    {REPO / c}" not in out] == []  # absolute: usable anywhere
    names = available_backbones()
    listed = set(re.findall(r"^  (\S+)\s+[\d.]+[MK]$", out, flags=re.MULTILINE))
    assert set(names) <= listed
    modules = [n for n in dm.__all__ if isinstance(getattr(dm, n), type) and n.endswith("DataModule")]
    assert all(re.search(rf"^  {n}\s", out, flags=re.MULTILINE) for n in modules)
    # methods come from the README's method table, with their status; folders it does not name are listed too
    assert "SAM, ASAM, SAM-ON, ASAM-ON, SSAM-F/D [ready]" in out and "arXiv 2306.04226" in out
    folders = {p.parent.relative_to(REPO / "configs").parts[0] for p in (REPO / "configs").rglob("*/*.yaml")}
    methods = catalog.catalog(REPO, ["methods"])["methods"]
    assert folders - {"base"} <= {f for m in methods for f in m["folders"]}


def test_parameter_counts_and_json_output(capsys):
    from lightning_methods.models import create_backbone

    for row in catalog.backbone_table(10, ["resnet8", "wrn_16_1", "vgg8"]):
        assert row["params"] == sum(p.numel() for p in create_backbone(row["name"], 10).parameters())
    data = catalog.main(["--section", "datamodules", "--format", "json"])
    assert json.loads(capsys.readouterr().out) == data
    assert {"name": "DigitsDataModule", "num_classes": 10} in [{k: d[k] for k in ("name", "num_classes")}
                                                               for d in data["datamodules"]]


def test_paper_lines_and_readme_table_parsing(tmp_path, capsys):
    (tmp_path / "configs/mine").mkdir(parents=True)
    cfg = tmp_path / "configs/mine/a.yaml"
    cfg.write_text("# My method on CIFAR-100 (arXiv 2401.00001).\n# paper: top1=84.2, test/acc_top5=97.1 (Table 2, "
                   "200 epochs)\n# paper: best/val/acc=85\nseed_everything: 0\n# paper: test/acc=1\n")
    (tmp_path / "README.md").write_text("# x\n\n## Methods\n\n| Method | Paper | Status | Entry point |\n|---|---|---|"
                                        "---|\n| Mine | Me, *A* (arXiv 2401.00001) | ready | `configs/mine/`, "
                                        "[docs](docs/m.md) |\n\nafter\n")
    data = catalog.catalog(tmp_path, ["methods", "configs"])
    assert data["methods"] == [{"method": "Mine", "paper": "Me, A (arXiv 2401.00001)", "status": "ready",
                                "entry_point": "configs/mine/, docs: docs/m.md", "folders": ["mine"]}]
    assert data["configs"]["mine"] == [{"path": "configs/mine/a.yaml", "file": str(cfg.resolve()),
                                        "summary": "My method on CIFAR-100 (arXiv 2401.00001).",
                                        "paper": {"test/acc": 84.2, "test/acc_top5": 97.1, "best/val/acc": 85.0},
                                        "paper_note": ""}]
    # a config whose paper value is unconfirmed says so in the listing (a citation line is not a note)
    (tmp_path / "configs/mine/b.yaml").write_text("# Mine on ImageNet.\n# paper: Me, *A*, 2024\n# paper: (no number: "
                                                  "the ImageNet table is unconfirmed here)\nseed_everything: 0\n")
    catalog.main(["--root", str(tmp_path), "--section", "configs"])
    listed = capsys.readouterr().out
    assert f"{(tmp_path / 'configs/mine/b.yaml').resolve()}  [paper: (no number: the ImageNet table is unconfirmed " \
           "here)]" in listed
    assert f"{cfg.resolve()}  [paper: test/acc=84.2, test/acc_top5=97.1, best/val/acc=85]" in listed


def test_descriptions_are_whole_and_plain(tmp_path):
    """A config's description is its header's first sentence however many lines it spans (never cut at a column), a
    DataModule's the first sentence of its docstring; markup (reStructuredText, Markdown) is dropped, code text kept."""
    cfg = tmp_path / "a.yaml"
    cfg.write_text("# A long description of a setup that goes on past one comment line, with ``code``, `more` and\n"
                   "# :class:`~lightning_methods.datamodules.DigitsDataModule` in it. Second sentence.\n"
                   "#   lightning-methods fit --config a.yaml\nseed_everything: 0\n")
    assert catalog.config_summary(cfg) == ("A long description of a setup that goes on past one comment line, with "
                                           "code, more and DigitsDataModule in it.")
    cfg.write_text("# Multi-GPU: add after the method config, e.g.\n#   --config configs/base/ddp.yaml\n# More.\n")
    assert catalog.config_summary(cfg) == "Multi-GPU: add after the method config."  # the lead-in to the command
    cfg.write_text("# Defaults; compose with repeated --config:\n#   --config a.yaml --config b.yaml\n")
    assert catalog.config_summary(cfg) == "Defaults; compose with repeated --config."
    folders = catalog.configs_by_folder(Path(__file__).resolve().parents[2])
    shipped = {item["path"]: item["summary"] for items in folders.values() for item in items}
    assert len(shipped) > 200
    cut = {path: text for path, text in shipped.items() if not text.endswith(".") or text.endswith((" e.g.", ":"))}
    assert not cut, f"config headers whose first sentence is cut (an indented line ends a paragraph): {cut}"
    assert catalog.plain_rst(":meth:`load_splits`, :func:`a.b.f`, :class:`title <a.B>`") == "load_splits, a.b.f, title"
    assert catalog._plain_markdown("`mlp*` / `vgg*_3fc`, **bold**, [docs](d.md)") == "mlp* / vgg*_3fc, bold, docs: d.md"
    rows = {r["name"]: r["summary"] for r in catalog.datamodule_table()}
    assert all("``" not in s and ":class:" not in s and ":meth:" not in s for s in rows.values())
    assert rows["CIFARDataModule"] == "Shared CIFAR logic; use CIFAR10DataModule or CIFAR100DataModule."


def test_top_level_help_points_to_list(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert re.search(r"^  list\s+methods, configs, backbones and DataModules", capsys.readouterr().out, re.MULTILINE)


def test_list_from_a_users_project_with_its_own_configs_folder_shows_the_packages(tmp_path, monkeypatch, capsys):
    """Run in a project of one's own that has a ``configs/`` folder too: the package's methods and configs are listed
    (the current directory is taken only when it is this package's source tree, or with ``--root``)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/mine.yaml").write_text("# My own experiment.\nmodel: {}\n")
    monkeypatch.chdir(tmp_path)
    data = catalog.main(["--section", "methods", "configs"])
    assert str(REPO / "configs/quickstart.yaml") in capsys.readouterr().out
    assert data["methods"] and "mine.yaml" not in json.dumps(data)
    mine = catalog.main(["--section", "configs", "--root", str(tmp_path)])  # asked for: the project's own configs
    assert "mine.yaml" in json.dumps(mine)
