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
    assert f"usage: lightning-methods {name}" in capsys.readouterr().out  # the usage line names the command


def test_a_console_entry_returns_nothing_so_success_exits_0(monkeypatch, capsys):
    """The console-script wrapper calls ``sys.exit(entry())``: any return value but None is exit status 1 (issue 21
    item 1). Run a command that returns a value through its entry as the console does (``args=None``)."""
    monkeypatch.setattr("sys.argv", ["lightning-methods-list", "--section", "datamodules"])
    assert cli.list_main() is None
    assert cli.list_main(["--section", "datamodules"])  # called from Python, the command's result comes back
    monkeypatch.setattr("sys.argv", ["lightning-methods", "list", "--section", "datamodules"])
    assert cli.main() is None
    assert "DigitsDataModule" in capsys.readouterr().out


def test_a_package_error_exits_1_with_its_message_last(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["lightning-methods-table", str(REPO / "no_such_folder")])
    with pytest.raises(SystemExit) as exit_info:
        cli.table_main()
    assert exit_info.value.code == 1
    assert "lightning-methods: error:" in capsys.readouterr().err.strip().splitlines()[-2]


@pytest.mark.parametrize("command,config", [("fed", "configs/federated/digits_demo.yaml"),
                                            ("ood", "configs/ood/digits_demo.yaml"),
                                            ("select", "configs/noisy_labels/digits_sym40.yaml")])
def test_fit_on_a_config_of_another_command_names_it(command, config):
    path = str(REPO / config)
    with pytest.raises(SystemExit, match=f"run: lightning-methods {command} --config {path}$"):
        cli.main(["fit", "--config", path])
    with pytest.raises(SystemExit, match=f"lightning-methods {command}"):
        cli.main(["fit", f"--config={path}", "--trainer.max_epochs=1"])
    cli.check_fit_config(["--config", str(REPO / "configs/quickstart.yaml")])  # a fit config passes


def test_light_commands_do_not_import_lightning():
    """``lightning-methods list`` / ``--help`` of the package's commands start without Lightning (seconds per call)."""
    import subprocess
    import sys

    code = ("import sys; import lightning_methods.cli, lightning_methods.results.table, lightning_methods.results.grid,"
            " lightning_methods.results.catalog, lightning_methods.hpn.cli, lightning_methods.hpn.sweep; "
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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


@pytest.mark.parametrize("args,says", [(["--lr", "inf"], "--lr must be a finite number"),
                                       (["--lr", "-0.1"], "--lr must be > 0"),
                                       (["--momentum", "nan"], "--momentum must be a finite number"),
                                       (["--iterations", "-1"], "--iterations must be >= 0")])
def test_prototypes_refuses_bad_values_before_optimising(args, says, tmp_path):
    out = tmp_path / "p.npy"
    with pytest.raises(SystemExit, match=says):
        cli.main(["prototypes", "--classes", "4", "--dims", "3", "--iterations", "10000000", "--out", str(out), *args])
    assert not out.exists()
