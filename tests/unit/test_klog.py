"""The one logging setup: JSON lines off a terminal, with the task's id when about one."""

from __future__ import annotations

import io
import json
import logging

import pytest

from schemas import new_event
from streams.klog import JsonFormatter, TextFormatter, setup_logging, task_extra


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("destra.test", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_line_is_parseable_and_carries_the_task_id() -> None:
    line = JsonFormatter().format(_record("placed %s on %s", "t-1", "gpu-7", task_id="t-1"))
    parsed = json.loads(line)
    assert parsed["task_id"] == "t-1"
    assert parsed["message"] == "placed t-1 on gpu-7"
    assert parsed["level"] == "INFO" and parsed["logger"] == "destra.test"
    assert parsed["ts"].endswith("Z") and "T" in parsed["ts"]
    assert "\n" not in line


def test_json_line_without_a_task_has_no_task_id_and_keeps_exceptions() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys
        record = _record("failed")
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert "task_id" not in parsed
    assert "ValueError: boom" in parsed["exc"]
    assert "\n" not in line


def test_task_extra_from_an_event() -> None:
    event = new_event("TaskFailed", "test", task_id="t-9", reason="no-capacity", detail="")
    assert task_extra(event) == {"task_id": "t-9"}
    assert task_extra(object()) == {}


def test_setup_picks_json_off_a_terminal_and_text_on_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DESTRA_LOG_FORMAT", raising=False)
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    handler = setup_logging("INFO", stream=out)
    try:
        logging.getLogger("destra.test").info("verdict", extra=task_extra(
            new_event("TaskFailed", "test", task_id="t-2", reason="x", detail="")))
        assert json.loads(out.getvalue().splitlines()[-1])["task_id"] == "t-2"
        assert isinstance(handler.formatter, JsonFormatter)
        again = setup_logging("INFO", stream=out, json_lines=False)
        assert handler not in root.handlers  # replaced, not stacked
        assert isinstance(again.formatter, TextFormatter)
        logging.getLogger("destra.test").info("run", extra={"task_id": "t-3"})
        assert "[task t-3]" in out.getvalue().splitlines()[-1]
    finally:
        for h in [h for h in root.handlers if getattr(h, "_destra_handler", False)]:
            root.removeHandler(h)
        root.setLevel(level)


def test_an_unknown_level_falls_back_to_info() -> None:
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    try:
        setup_logging("VERBOSE", stream=out, json_lines=True)
        assert root.level == logging.INFO
        assert "unknown log level" in json.loads(out.getvalue().splitlines()[-1])["message"]
    finally:
        for h in [h for h in root.handlers if getattr(h, "_destra_handler", False)]:
            root.removeHandler(h)
        root.setLevel(level)
