"""The package's commands build many Trainers (an OOD run: one per embedded image set and encoder, per RDM fit and
scoring); Lightning's device lines print once per command and its install tips never (lightning_methods.utils.quiet),
where they printed four lines per Trainer."""

from __future__ import annotations

import logging

import lightning.pytorch as pl

from lightning_methods.cli import run_command
from lightning_methods.utils.quiet import quiet_trainers


def _trainers(n: int) -> None:
    for _ in range(n):
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)


def _shown(caplog) -> str:
    """What reached the log handlers (Lightning's own console handler or pytest's) since the last call."""
    text = "\n".join(record.getMessage() for record in caplog.records)
    caplog.clear()
    return text


def test_device_lines_once_and_no_tips_while_quiet(caplog):
    caplog.set_level(logging.INFO)
    _trainers(2)  # as Lightning prints them: the lines of every Trainer (tips where Lightning gives them)
    loud = _shown(caplog)
    assert loud.count("GPU available") == 2 and loud.count("TPU available") == 2
    with quiet_trainers():
        _trainers(3)
    quiet = _shown(caplog)
    assert quiet.count("GPU available: False, used: False") == 1 and quiet.count("TPU available") == 1
    assert "Tip:" not in quiet
    _trainers(1)  # afterwards Lightning's logging is as it was
    assert _shown(caplog).count("GPU available") == 1


def test_every_package_command_runs_quiet(monkeypatch, caplog):
    """``run_command`` is the one way into a package command (``lightning-methods <c>``, ``lightning-methods-<c>``)."""
    import lightning_methods.results.catalog as catalog

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(catalog, "main", lambda args: _trainers(2))
    run_command("list", [])
    shown = _shown(caplog)
    assert shown.count("GPU available") == 1 and "Tip:" not in shown
