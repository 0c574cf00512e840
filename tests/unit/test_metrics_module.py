"""streams.metrics: reason codes, the instruments, the endpoint and its file."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from prometheus_client import REGISTRY

from streams import metrics


def test_reason_codes_are_short_and_few() -> None:
    assert metrics.reason_code("insufficient-funds: 3 < 5") == "insufficient-funds"
    assert metrics.reason_code("late-commit") == "late-commit"
    assert metrics.reason_code("task abc is unknown") == "rejected"
    assert metrics.reason_code("Handler blew up: x") == "rejected"


def test_instruments_count_by_processor_and_event() -> None:
    before = REGISTRY.get_sample_value("destra_events_handled_total",
                                       {"processor": "unit-p", "event": "TaskSubmitted"}) or 0
    inst = metrics.Instruments()
    for _ in range(3):
        inst.handled("unit-p", "TaskSubmitted", 0.0001)
    inst.emitted("UnitEvent")
    after = REGISTRY.get_sample_value("destra_events_handled_total",
                                      {"processor": "unit-p", "event": "TaskSubmitted"})
    assert after == before + 3
    assert REGISTRY.get_sample_value("destra_handler_seconds_count",
                                     {"processor": "unit-p"}) == 3
    assert REGISTRY.get_sample_value("destra_events_emitted_total", {"event": "UnitEvent"}) == 1


def test_serve_announces_records_and_answers(tmp_path: Path) -> None:
    said: list[str] = []
    metrics.register(metrics.Collected("destra_unit_gauge", "a test gauge", ["k"],
                                       lambda: {("a",): 2.0}))
    url = metrics.serve("unit-service", tmp_path, say=said.append)
    assert said == [f"metrics: {url}"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    recorded = json.loads((tmp_path / "metrics" / "unit-service.json").read_text())
    assert recorded == {"name": "unit-service", "pid": os.getpid(), "url": url}
    assert metrics.registered(tmp_path) == [recorded]
    body = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 - our own
    assert 'destra_unit_gauge{k="a"} 2.0' in body
    assert metrics.serve("again", tmp_path) == url  # once per process


def test_registered_skips_dead_processes(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "gone.json").write_text(
        json.dumps({"name": "gone", "pid": 2**22 + 12345, "url": "http://x"}))
    (tmp_path / "metrics" / "junk.json").write_text("not json")
    assert metrics.registered(tmp_path) == []


def test_infra_status_text_lists_the_metrics_endpoints() -> None:
    from destra.cli import _status_text

    endpoint = {"name": "processors", "pid": 42, "url": "http://127.0.0.1:9/metrics"}
    text = _status_text({"state_file": "/x/infra.json", "metrics": [endpoint]})
    assert text.splitlines() == ["not running (no /x/infra.json)",
                                 "metrics   processors  pid 42  http://127.0.0.1:9/metrics"]
