"""Every service's Prometheus metrics, and the one HTTP endpoint that serves them.

A service calls ``serve(name, home)`` once at start: it listens on
``DESTRA_METRICS_PORT`` (0 or unset: a free port the kernel picks, so any number of
services share a machine), prints ``metrics: http://127.0.0.1:PORT/metrics`` on stderr
and writes ``$DESTRA_HOME/metrics/<name>.json`` (name, pid, url), which ``destra infra
status`` lists while the pid is alive (``registered``).

The metrics (all in prometheus_client's default registry, labels from small fixed sets:
processor and event type names, topics, reason codes, workloads; never a task):

* ``destra_events_handled_total{processor,event}``: events handed to a processor's handler;
* ``destra_handler_seconds{processor}``: the handler's latency, a histogram;
* ``destra_events_emitted_total{event}``: events a runner produced (committed or not:
  a batch that aborts is counted again when it runs again);
* ``destra_dead_letters_total{reason}``: records dead-lettered, by a short code;
* ``destra_consumer_lag{group,topic}``: records not read yet of an input topic, summed over
  its partitions (high watermark - position, refreshed every ``LAG_EVERY_S``);
* ``destra_batches_total{group}``: transactions committed;
* read when scraped (``Collected``): the ledger decider's
  ``destra_ledger_micro{account=treasury|escrow|escrow-tasks}`` (``ledger.processor``) and
  the projector's ``destra_tasks{status}`` (``ledger.service``);
* the projector's ``destra_projected_records_total{projection}``;
* a node's ``destra_node_tasks_run_total{workload}`` and
  ``destra_node_compute_seconds_total{workload}``.

The runner's hot path pays a dictionary look-up and two lock-guarded adds per event
(``Instruments``); ``bench/metrics.py`` prints the ratio.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

PORT_ENV = "DESTRA_METRICS_PORT"
LAG_EVERY_S = 2.0
"""How often a runner refreshes its consumer-lag gauges (from the watermarks the consumer
already holds: no request to the broker)."""

EVENTS_HANDLED = Counter("destra_events_handled", "Events handed to a processor's handler",
                         ["processor", "event"])
HANDLER_SECONDS = Histogram("destra_handler_seconds", "A processor's handler latency",
                            ["processor"],
                            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                     0.01, 0.025, 0.05, 0.1, 0.5, 1.0))
EVENTS_EMITTED = Counter("destra_events_emitted", "Events a runner produced", ["event"])
DEAD_LETTERS = Counter("destra_dead_letters", "Records dead-lettered, by reason code",
                       ["reason"])
CONSUMER_LAG = Gauge("destra_consumer_lag",
                     "Records of an input topic not read yet (high watermark - position)",
                     ["group", "topic"])
BATCHES = Counter("destra_batches", "Transactions a runner committed", ["group"])
PROJECTED = Counter("destra_projected_records", "Records a projection applied",
                    ["projection"])
NODE_TASKS = Counter("destra_node_tasks_run", "Replicas a node computed", ["workload"])
NODE_SECONDS = Counter("destra_node_compute_seconds", "Seconds a node spent computing",
                       ["workload"])

_CODE = re.compile(r"([a-z][a-z0-9_-]{1,40})(?::|$)")
MAX_CODES = 64
_codes: set[str] = set()


def reason_code(reason: str, default: str = "rejected") -> str:
    """A short code for a dead letter's reason: its leading ``word-like-this`` when followed
    by ``:`` or nothing (``insufficient-funds: ...``), else ``default``; never more than
    ``MAX_CODES`` distinct codes (then ``other``), so a label set stays small."""
    match = _CODE.match(reason)
    if match is None:
        return default
    code = match.group(1)
    if code not in _codes:
        if len(_codes) >= MAX_CODES:
            return "other"
        _codes.add(code)
    return code


class Instruments:
    """The children of the per-event metrics, made once per label set: ``labels()`` costs
    a lock and a tuple build that the hot path need not pay each time."""

    def __init__(self) -> None:
        self._handled: dict[tuple[str, str], Any] = {}
        self._latency: dict[str, Any] = {}
        self._emitted: dict[str, Any] = {}

    def handled(self, processor: str, event: str, seconds: float) -> None:
        """One event handled by ``processor`` in ``seconds``."""
        key = (processor, event)
        counter = self._handled.get(key)
        if counter is None:
            counter = self._handled[key] = EVENTS_HANDLED.labels(processor, event)
        counter.inc()
        histogram = self._latency.get(processor)
        if histogram is None:
            histogram = self._latency[processor] = HANDLER_SECONDS.labels(processor)
        histogram.observe(seconds)

    def emitted(self, event: str) -> None:
        """One event produced."""
        counter = self._emitted.get(event)
        if counter is None:
            counter = self._emitted[event] = EVENTS_EMITTED.labels(event)
        counter.inc()


def dead_lettered(reason: str) -> None:
    """One record dead-lettered for ``reason`` (a code: ``reason_code``)."""
    DEAD_LETTERS.labels(reason).inc()


def node_ran(workload: str, seconds: float) -> None:
    """A node computed one replica of ``workload`` in ``seconds``."""
    NODE_TASKS.labels(workload).inc()
    NODE_SECONDS.labels(workload).inc(seconds)


class Collected:
    """A gauge family whose samples are read when scraped (``read`` returns
    ``{label values: value}``), for figures a service already holds (balances) or can
    count cheaply on demand (tasks by status): nothing on the hot path."""

    def __init__(self, name: str, documentation: str, labels: list[str],
                 read: Callable[[], dict[tuple[str, ...], float]]) -> None:
        self.name, self.documentation, self.labels, self.read = name, documentation, labels, read

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, value in self.read().items():
            family.add_metric(list(values), value)
        yield family

    def describe(self) -> Any:
        return []  # not collected at registration: ``read`` may need a service not up yet


def register(collector: Collected) -> None:
    """Add a collector to the default registry (what ``serve`` exposes)."""
    from prometheus_client import REGISTRY

    REGISTRY.register(collector)


_served: dict[str, Any] = {}
_lock = threading.Lock()


def metrics_dir(home: Path) -> Path:
    """Where services say where their metrics are: ``$DESTRA_HOME/metrics``."""
    return home / "metrics"


def serve(name: str, home: Path, port: int | None = None, *,
          say: Callable[[str], None] | None = None) -> str:
    """Serve this process's metrics over HTTP on 127.0.0.1 (``port``, else
    ``DESTRA_METRICS_PORT``, else a free one); announce the URL and record it in
    ``$DESTRA_HOME/metrics/<name>.json``. The URL. Once per process: a second call returns
    the first URL."""
    with _lock:
        if "url" in _served:
            return str(_served["url"])
        if port is None:
            raw = os.environ.get(PORT_ENV) or "0"
            try:
                port = int(raw)
            except ValueError:
                raise ValueError(f"{PORT_ENV} must be a port number, got {raw!r}") from None
        server, _thread = start_http_server(port, addr="127.0.0.1")
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        _served.update(url=url, server=server)
        directory = metrics_dir(home)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_file_name(name)}.json"
        if path.exists() and _owner_alive(path):
            path = directory / f"{_file_name(name)}-{os.getpid()}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"name": name, "pid": os.getpid(), "url": url}) + "\n")
        tmp.replace(path)
        _served["path"] = path
    (say or (lambda line: print(line, file=sys.stderr, flush=True)))(f"metrics: {url}")
    return url


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "service"


def _owner_alive(path: Path) -> bool:
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return pid != os.getpid() and _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def registered(home: Path) -> list[dict[str, Any]]:
    """The services whose metrics files name a live process: name, pid, url; sorted by
    name."""
    found = []
    directory = metrics_dir(home)
    if not directory.is_dir():
        return []
    for path in sorted(directory.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
            pid = int(entry["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid):
            found.append({"name": str(entry.get("name", path.stem)), "pid": pid,
                          "url": str(entry.get("url", ""))})
    return sorted(found, key=lambda e: (e["name"], e["pid"]))
