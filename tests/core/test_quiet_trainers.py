"""The package's commands build many Trainers (an OOD run: one per embedded image set and encoder, per RDM fit and
scoring); Lightning's device lines print once per command and its install tips never (lightning_methods.utils.quiet),
where they printed four lines per Trainer."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest

from lightning_methods.cli import run_command
from lightning_methods.utils.quiet import LIGHTNING_INFO_LOGGERS, quiet_trainers


def _trainers(n: int) -> None:
    for _ in range(n):
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)


class _Shown(logging.Handler):
    """Collects what Lightning's device and tip logger lets through (after its filters), whether or not Lightning's
    loggers propagate to the root logger (they do not in lightning 2.6.0, they do in 2.6.6 under pytest)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> str:
        text, self.lines = "\n".join(self.lines), []
        return text


@pytest.fixture
def shown():
    logger = logging.getLogger(LIGHTNING_INFO_LOGGERS[0])
    handler, level = _Shown(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_device_lines_once_and_no_tips_while_quiet(shown):
    _trainers(2)  # as Lightning prints them: the lines of every Trainer (tips where Lightning gives them)
    loud = shown.take()
    assert loud.count("GPU available") == 2 and loud.count("TPU available") == 2
    with quiet_trainers():
        _trainers(3)
    quiet = shown.take()
    assert quiet.count("GPU available: False, used: False") == 1 and quiet.count("TPU available") == 1
    assert "Tip:" not in quiet
    _trainers(1)  # afterwards Lightning's logging is as it was
    assert shown.take().count("GPU available") == 1


def test_every_package_command_runs_quiet(monkeypatch, shown):
    """``run_command`` is the one way into a package command (``lightning-methods <c>``, ``lightning-methods-<c>``)."""
    import lightning_methods.results.catalog as catalog

    monkeypatch.setattr(catalog, "main", lambda args: _trainers(2))
    run_command("list", [])
    text = shown.take()
    assert text.count("GPU available") == 1 and "Tip:" not in text
