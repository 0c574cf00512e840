"""Every service's Prometheus metrics, and the one HTTP endpoint that serves them.

A service calls ``serve(name, home)`` once at start: it listens on
``DESTRA_METRICS_PORT`` (0 or unset: a free port the kernel picks, so any number of
services share a machine), prints ``metrics: http://127.0.0.1:PORT/metrics`` on stderr
and writes ``$DESTRA_HOME/metrics/<name>.json`` (name, pid, url), which ``destra infra
status`` lists while the pid is alive (``registered``).

The metrics (all in prometheus_client's default registry, labels from small fixed sets:
processor and event type names, topics, reason codes, workloads; never a task):

* ``destra_events_handled_total{processor,event}``: events handed to a processor's handler
  (counted as handled: a batch rewound after a handler raised on a poison record counts
  the events before it twice);
* ``destra_handler_seconds{processor}``: the handler's latency, a histogram;
* ``destra_events_emitted_total{event}``: events a runner produced (counted as sent: a
  transaction that fails kills the process, and its counts with it);
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

The runner's hot path pays two dictionary updates and a bisect per event, and one
dictionary update per event it emits (``Instruments``: turned into metrics when scraped);
``bench/metrics.py`` prints the ratio.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import threading
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, start_http_server

PORT_ENV = "DESTRA_METRICS_PORT"
LAG_EVERY_S = 2.0
"""How often a runner refreshes its consumer-lag gauges (from the watermarks the consumer
already holds: no request to the broker)."""

HANDLER_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.5, 1.0)
"""``destra_handler_seconds``'s upper bounds, in seconds (then +Inf)."""
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

_lock = threading.Lock()

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
    """One runner's per-event figures, kept in plain dictionaries and lists by the runner's
    thread and turned into metrics only when scraped (``_RunnerFigures``): a
    prometheus_client counter takes a lock on each ``inc`` and a histogram walks its buckets
    in Python on each ``observe``, about 3 us an event between them, against 0.3 here
    (``bench/metrics.py``). One per runner, so no two threads ever add to the same one."""

    def __init__(self) -> None:
        self.handled_counts: dict[tuple[str, str], int] = {}
        self.emitted_counts: dict[str, int] = {}
        self.latency: dict[str, list[int]] = {}
        """Per processor, the handlings in each bucket (not cumulative), +Inf last."""
        self.latency_sum: dict[str, float] = {}
        with _lock:
            _instruments.append(self)

    def handled(self, processor: str, event: str, seconds: float) -> None:
        """One event handled by ``processor`` in ``seconds``."""
        counts = self.handled_counts
        key = (processor, event)
        counts[key] = counts.get(key, 0) + 1
        buckets = self.latency.get(processor)
        if buckets is None:
            buckets = self.latency[processor] = [0] * (len(HANDLER_BUCKETS) + 1)
            self.latency_sum[processor] = 0.0
        buckets[bisect_left(HANDLER_BUCKETS, seconds)] += 1
        self.latency_sum[processor] += seconds

    def emitted(self, event: str) -> None:
        """One event produced."""
        counts = self.emitted_counts
        counts[event] = counts.get(event, 0) + 1


_instruments: list[Instruments] = []
"""Every runner's instruments in this process, stopped runners' too (a counter never goes
back)."""


class _RunnerFigures:
    """``destra_events_handled_total``, ``destra_handler_seconds`` and
    ``destra_events_emitted_total``, summed over this process's runners when scraped."""

    def describe(self) -> list[Any]:
        return self._families({}, {}, {}, {})

    def collect(self) -> list[Any]:
        handled: dict[tuple[str, str], int] = {}
        emitted: dict[str, int] = {}
        latency: dict[str, list[int]] = {}
        sums: dict[str, float] = {}
        with _lock:
            every = list(_instruments)
        for inst in every:
            # Each copy is one C call under the GIL: the runner's thread may be adding.
            for key, n in dict(inst.handled_counts).items():
                handled[key] = handled.get(key, 0) + n
            for name, n in dict(inst.emitted_counts).items():
                emitted[name] = emitted.get(name, 0) + n
            for processor, buckets in dict(inst.latency).items():
                into = latency.setdefault(processor, [0] * (len(HANDLER_BUCKETS) + 1))
                for i, n in enumerate(list(buckets)):
                    into[i] += n
                sums[processor] = sums.get(processor, 0.0) + inst.latency_sum.get(processor, 0.0)
        return self._families(handled, emitted, latency, sums)

    @staticmethod
    def _families(handled: dict[tuple[str, str], int], emitted: dict[str, int],
                  latency: dict[str, list[int]], sums: dict[str, float]) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        handled_family = CounterMetricFamily(
            "destra_events_handled", "Events handed to a processor's handler",
            labels=["processor", "event"])
        for (processor, event), n in sorted(handled.items()):
            handled_family.add_metric([processor, event], n)
        latency_family = HistogramMetricFamily(
            "destra_handler_seconds", "A processor's handler latency", labels=["processor"])
        for processor, buckets in sorted(latency.items()):
            cumulative, running = [], 0
            for bound, n in zip([*map(str, HANDLER_BUCKETS), "+Inf"], buckets, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            latency_family.add_metric([processor], cumulative, sums.get(processor, 0.0))
        emitted_family = CounterMetricFamily("destra_events_emitted",
                                             "Events a runner produced", labels=["event"])
        for event, n in sorted(emitted.items()):
            emitted_family.add_metric([event], n)
        return [handled_family, latency_family, emitted_family]


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
    REGISTRY.register(collector)


REGISTRY.register(_RunnerFigures())  # type: ignore[arg-type]


_served: dict[str, Any] = {}


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
        atexit.register(_forget, path)
    (say or (lambda line: print(line, file=sys.stderr, flush=True)))(f"metrics: {url}")
    return url


def _forget(path: Path) -> None:
    """Remove this process's metrics file as it exits (a killed one's stays, and
    ``registered`` skips it by its pid)."""
    try:
        if int(json.loads(path.read_text())["pid"]) == os.getpid():
            path.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass


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
