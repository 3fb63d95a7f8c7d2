"""Lightning's per-Trainer chatter, once per command: the package's commands build many Trainers (one per embedding,
RDM fit, client round, selection round, sweep stage), and each printed the device lines (``GPU available: False,
used: False``, ``TPU available: ...``) and Lightning's install tips again; and W&B's warning about the
``anonymous`` setting that Lightning's ``WandbLogger`` passes (:func:`quiet_wandb`). Imports nothing heavy: the
filters attach to Lightning's loggers by name."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

#: The loggers through which Lightning prints its device lines and tips.
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning_utilities.core.rank_zero")
TIP = "\N{ELECTRIC LIGHT BULB} Tip:"
DEVICE_LINES = ("GPU available", "TPU available", "HPU available", "IPU available")


class OncePerCommand(logging.Filter):
    """Drops Lightning's install tips, and every device line already shown (the first of each passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        if message.startswith(TIP):
            return False
        if message.startswith(DEVICE_LINES):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


@contextlib.contextmanager
def quiet_trainers() -> Iterator[OncePerCommand]:
    """While a command runs: Lightning's tips hidden, each device line shown once."""
    once, loggers = OncePerCommand(), [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addFilter(once)
    try:
        yield once
    finally:
        for logger in loggers:
            logger.removeFilter(once)


def quiet_wandb(loggers: Iterable[Any] | None) -> None:
    """Drop the ``anonymous=None`` that Lightning's ``WandbLogger`` passes to ``wandb.init`` (W&B warns that the
    setting has no effect) from loggers whose W&B run has not started; call it right after building a Trainer."""
    for logger in loggers or []:
        init = getattr(logger, "_wandb_init", None)  # Lightning's WandbLogger: the keyword arguments of wandb.init
        if isinstance(init, dict) and init.get("anonymous", 0) is None and getattr(logger, "_experiment", 1) is None:
            init.pop("anonymous")
