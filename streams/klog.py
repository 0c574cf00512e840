"""Logging: one setup for every service and the CLI, and where librdkafka's lines go.

``setup_logging()`` once at a process's start: JSON lines on stderr when it is not a
terminal (a service under a supervisor, ``LocalNetwork``'s log files), one object a line
with ``ts`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message``, and
``task_id`` when the line is about a task (``extra=task_extra(event)`` or
``extra={"task_id": ...}``), ``exc`` with a traceback; a readable line when stderr is a
terminal. ``DESTRA_LOG_LEVEL`` sets the level (INFO), ``DESTRA_LOG_FORMAT`` (``json`` or
``text``) overrides the choice.

A fresh broker makes clients log "coordinator load in progress: retrying"
and the like; those are expected and belong in a log, not on stdout: librdkafka's
lines go to the ``destra.kafka`` logger (``KAFKA_LOG``), quiet below WARNING.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

KAFKA_LOG = logging.getLogger("destra.kafka")
KAFKA_LOG.addHandler(logging.NullHandler())

LEVEL_ENV = "DESTRA_LOG_LEVEL"
FORMAT_ENV = "DESTRA_LOG_FORMAT"
_MARK = "_destra_handler"


def task_extra(event: Any) -> dict[str, str]:
    """``extra`` for a log line about ``event``: its ``task_id`` when it has one."""
    fields = getattr(event, "fields", None)
    task_id = fields.get("task_id") if isinstance(fields, dict) else None
    return {"task_id": task_id} if isinstance(task_id, str) else {}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, task_id (when there), exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname,
                                "logger": record.name, "message": record.getMessage()}
        task_id = getattr(record, "task_id", None)
        if task_id is not None:
            line["task_id"] = str(task_id)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger [task] message`` for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        task_id = getattr(record, "task_id", None)
        task = f" [task {task_id}]" if task_id is not None else ""
        text = f"{clock} {record.levelname:<7} {record.name}{task}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: int | str | None = None, stream: IO[str] | None = None,
                  json_lines: bool | None = None) -> logging.Handler:
    """Send the root logger's lines to ``stream`` (stderr): JSON lines unless it is a
    terminal (``json_lines`` or ``DESTRA_LOG_FORMAT`` decide otherwise). Called again, it
    replaces the handler it added before, never stacks another. The handler."""
    if json_lines is None:
        chosen = os.environ.get(FORMAT_ENV, "").lower()
        json_lines = chosen == "json" or (
            chosen != "text" and not _is_terminal(stream if stream is not None else sys.stderr))
    handler: logging.Handler = (logging.StreamHandler(stream) if stream is not None
                                else _Stderr())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    setattr(handler, _MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    wanted = level if level is not None else os.environ.get(LEVEL_ENV, "INFO").upper()
    try:
        root.setLevel(wanted)
    except ValueError:  # a level name logging does not know: say so, in the lines it sets up
        root.setLevel(logging.INFO)
        logging.getLogger(__name__).warning("unknown log level %r: INFO", wanted)
    KAFKA_LOG.setLevel(logging.WARNING)
    return handler


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged (a test's capture, a
    CLI runner's buffer), as ``logging.lastResort`` does."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
