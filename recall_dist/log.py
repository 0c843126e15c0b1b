"""What the package reports while it works (a run resumed, a stale lock taken over, a damaged checkpoint
set aside), through ``logging`` with one format: ``recall-dist <component>: [WARNING: ]<message>`` on
stderr.  The command-line entry points keep printing their one-line usage errors themselves.

Every module asks for ``get_logger("<component>")`` (``train``, ``torchrun``, ...): a child of the
``recall_dist`` logger, which has one handler of its own and does not propagate, so a job log shows each
line once whatever the root logger does.  To take it over, configure ``logging.getLogger("recall_dist")``
(level, handlers, ``propagate = True``).
"""

from __future__ import annotations

import logging
import sys

ROOT = "recall_dist"


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        component = record.name.removeprefix(ROOT).lstrip(".") or "recall-dist"
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        return f"recall-dist {component}: {level}{record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (pytest's capture, a redirected job log), not to the
    stream that was current when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Format())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def get_logger(component: str) -> logging.Logger:
    """The logger of ``component`` (``recall-dist <component>: ...`` on stderr, INFO and above)."""
    _root()
    return logging.getLogger(f"{ROOT}.{component}")
