"""The dashboard's services panel reads the services' own ``/metrics`` (served here by
prometheus_client's real HTTP server): rates between two scrapes, handler latency from
the histogram's buckets, lag, dead letters and balances; a dead endpoint shows as down."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from destra.dashboard import pages
from destra.dashboard.hub import Snapshot
from destra.dashboard.services import Scraper, quantile
from streams.metrics import HANDLER_BUCKETS, metrics_dir
from tests.support import free_port_block


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    cumulative = {0.001: 10.0, 0.01: 30.0, 0.1: 40.0, float("inf"): 40.0}
    assert quantile(0.25, cumulative) == pytest.approx(0.001)  # rank 10: the first bound
    assert quantile(0.5, cumulative) == pytest.approx(0.001 + 0.009 * 10 / 20)
    assert quantile(1.0, cumulative) == pytest.approx(0.1)
    assert quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.99, {0.1: 0.0, float("inf"): 5.0}) == pytest.approx(0.1)


def _record(home: Path, name: str, url: str) -> None:
    directory = metrics_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(
        {"name": name, "pid": os.getpid(), "url": url}))


def test_scraper_reads_rates_latency_lag_dead_letters_and_balances(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    handled = Counter("destra_events_handled", "", ["processor", "event"], registry=registry)
    latency = Histogram("destra_handler_seconds", "", ["processor"], buckets=HANDLER_BUCKETS,
                        registry=registry)
    lag = Gauge("destra_consumer_lag", "", ["group", "topic"], registry=registry)
    dead = Counter("destra_dead_letters", "", ["reason"], registry=registry)
    money = Gauge("destra_ledger_micro", "", ["account"], registry=registry)
    port = free_port_block(2)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        _record(tmp_path, "ledger-processor", f"http://127.0.0.1:{port}/metrics")
        _record(tmp_path, "gone", f"http://127.0.0.1:{port + 1}/metrics")
        scraper = Scraper(tmp_path)
        handled.labels("ledger", "TaskVerified").inc(5)
        assert scraper.poll(now=100.0)
        assert not scraper.poll(now=101.0), "scraped again within SCRAPE_EVERY_S"
        handled.labels("ledger", "TaskVerified").inc(30)
        handled.labels("ledger", "TaskSubmitted").inc(10)
        for _ in range(90):
            latency.labels("ledger").observe(0.0003)  # in the (0.00025, 0.0005] bucket
        for _ in range(10):
            latency.labels("ledger").observe(0.02)  # in the (0.01, 0.025] bucket
        lag.labels("ledger", "tasks").set(7)
        lag.labels("ledger", "results").set(3)
        dead.labels("insufficient-funds").inc(2)
        money.labels("treasury").set(1_234)
        money.labels("escrow").set(0)
        assert scraper.poll(now=104.0)
        view = scraper.view()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    by_name = {r["name"]: r for r in view["services"]}
    ledger = by_name["ledger-processor"]
    assert ledger["up"] and ledger["handled"] == 45
    assert ledger["handled_per_s"] == pytest.approx(40 / 4)
    assert 0.25 < ledger["p50_ms"] <= 0.5
    assert 10 < ledger["p99_ms"] <= 25
    assert ledger["lag"] == 10 and ledger["dead_letters"] == 2
    assert [x for _, x in ledger["rates"]] == [pytest.approx(10.0)]
    assert not by_name["gone"]["up"] and by_name["gone"]["error"]
    assert view["dead_by_reason"] == {"insufficient-funds": 2}
    assert view["ledger_micro"] == {"escrow": 0, "treasury": 1_234}

    # The network page shows them: the table, both plots, the balances.
    part = pages.network_part(Snapshot(version=1, views={"now": 0}, services=view))
    table = part["html"]["services-table"]
    assert "ledger-processor" in table and "10.0" in table and "no: " in table
    assert "insufficient-funds 2" in table
    assert "treasury: <strong>1,234</strong>" in part["html"]["network-summary"]
    rates = part["plots"]["plot-service-rates"]["data"]
    assert [t["name"] for t in rates] == ["ledger-processor"]
    latency_bars = part["plots"]["plot-service-latency"]["data"]
    assert [t["name"] for t in latency_bars] == ["p50", "p99"]


def test_a_service_that_stopped_leaves_the_panel(tmp_path: Path) -> None:
    calls: list[str] = []

    def get(url: str) -> list[tuple[str, dict[str, str], float]]:
        calls.append(url)
        return [("destra_events_handled_total", {"processor": "p", "event": "E"}, 1.0),
                ("destra_projected_records_total", {"projection": "ledger"}, 4.0)]

    _record(tmp_path, "projector", "http://127.0.0.1:1/metrics")
    scraper = Scraper(tmp_path, get=get)
    scraper.poll(now=0.0)
    assert [(r["name"], r["handled"]) for r in scraper.view()["services"]] == [
        ("projector", 5.0)], "a projection's records applied count as handled"
    (metrics_dir(tmp_path) / "projector.json").unlink()
    scraper.poll(now=10.0)
    assert scraper.view()["services"] == [] and calls == ["http://127.0.0.1:1/metrics"]
