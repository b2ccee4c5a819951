"""The run's log file (train.log in the run dir), written only once the run dir is ready.

Hydra opens its job log in the run dir before the task starts, so a run refused at start would leave a
log in a fresh folder, or append its lines to the log of the run it was refused to touch.
mleps/conf/train.yaml names `RunLogHandler` as Hydra's file handler instead: it keeps the records in
memory until `mleps.rundir` has prepared the run dir (`open_run_logs`), then writes them and every later
one. A run refused before that writes nothing there (its lines still reach the console).
"""
from __future__ import annotations

import logging
import os
import weakref

_HANDLERS: "weakref.WeakSet[RunLogHandler]" = weakref.WeakSet()
_MAX_HELD = 100_000  # records kept before the run dir is ready (a start logs a few dozen)


class RunLogHandler(logging.FileHandler):
    def __init__(self, filename, mode: str = "a", encoding=None, delay: bool = True, errors=None):
        super().__init__(filename, mode, encoding, delay=True, errors=errors)  # no file until it is ready
        self.held: list[logging.LogRecord] | None = []
        _HANDLERS.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is None:
            super().emit(record)
        elif len(self.held) < _MAX_HELD:
            self.held.append(record)

    def open(self) -> None:
        held, self.held = self.held, None
        for record in held or []:
            super().emit(record)


def open_run_logs(run_dir) -> None:
    """The run dir is ready: the held records of its log files are written, and every later one."""
    folder = os.path.abspath(run_dir)
    for handler in list(_HANDLERS):
        if handler.held is not None and os.path.dirname(handler.baseFilename) == folder:
            handler.open()
