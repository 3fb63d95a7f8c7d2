"""One command-line scheme: LightningCLI's fit / validate / test / predict plus the package's commands, each reachable
as ``lightning-methods <command>`` and as the console script ``lightning-methods-<command>``, each with ``--help``,
all listed by ``lightning-methods --help`` and in the README's command table."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_methods import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_console_scripts_and_readme_list_every_command():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    readme = (REPO / "README.md").read_text()
    assert scripts["lightning-methods"] == "lightning_methods.cli:main"
    for name in cli.COMMANDS:
        function = f"{name.replace('-', '_')}_main"
        assert scripts[f"lightning-methods-{name}"] == f"lightning_methods.cli:{function}"
        assert callable(getattr(cli, function))
        assert f"lightning-methods {name}" in readme or f"lightning-methods-{name}" in readme, name


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in cli.COMMANDS) and "fit" in out
