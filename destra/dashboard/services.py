"""The services' own figures on the dashboard: every live service's ``/metrics``, scraped.

The network page's per-process panel reads exactly what Prometheus would (``streams.metrics``):
the services listed in ``$DESTRA_HOME/metrics`` are scraped at most every ``SCRAPE_EVERY_S``
(over HTTP, never Postgres), and between two scrapes of a service its counters give

* events handled per second, by service (and a time series of it): a runner's
  ``destra_events_handled_total``, and the projector's records applied
  (``destra_projected_records_total``: its projections are its handlers, applied a batch
  per transaction, so it has no per-event latency);
* the handler's latency, median and p99, from the histogram's buckets counted in that
  window (``histogram_quantile``'s linear interpolation inside a bucket);
* consumer lag, summed over the service's groups and topics;
* dead letters by reason code, and the ledger's treasury and escrow balances.

A service that does not answer within ``TIMEOUT_S`` is shown as down; nothing else waits.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from streams.metrics import registered

SCRAPE_EVERY_S = 2.0
TIMEOUT_S = 0.5
KEPT = 300
"""Rate points kept per service (10 minutes at one scrape every 2 s)."""

Sample = tuple[str, dict[str, str], float]


def fetch(url: str) -> list[Sample]:
    """Every sample of one ``/metrics`` page: (name, labels, value)."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - ours
        body = response.read().decode()
    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(body) for s in family.samples]


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, ls, v in samples
               if n == name and all(ls.get(k) == want for k, want in labels.items()))


HANDLED = ("destra_events_handled_total", "destra_projected_records_total")


def handled(samples: Iterable[Sample]) -> float:
    """Events a service handled: its runners' and its projections' counts."""
    listed = list(samples)
    return sum(total(listed, name) for name in HANDLED)


def buckets(samples: Iterable[Sample], name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound, summed over its label sets."""
    out: dict[float, float] = {}
    for n, labels, value in samples:
        if n == f"{name}_bucket":
            le = float(labels["le"])
            out[le] = out.get(le, 0.0) + value
    return dict(sorted(out.items()))


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """Prometheus's ``histogram_quantile``: the bucket holding rank ``q`` of the count,
    linearly interpolated inside it (the +Inf bucket answers its lower bound). ``None``
    when the histogram counted nothing."""
    bounds = list(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return lower


@dataclass
class Service:
    """One service's last scrape and the rates since its previous one."""

    name: str
    pid: int
    url: str
    up: bool = False
    error: str = ""
    at: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    handled_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rates: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=KEPT))


class Scraper:
    """The services of one ``DESTRA_HOME``, scraped at most every ``every_s`` seconds."""

    def __init__(self, home: Path, *, every_s: float = SCRAPE_EVERY_S,
                 get: Callable[[str], list[Sample]] = fetch) -> None:
        self.home, self.every_s, self._get = home, every_s, get
        self.services: dict[tuple[str, int], Service] = {}
        self.scrapes = 0
        self._last = -math.inf

    def poll(self, now: float | None = None) -> bool:
        """Scrape every live service if ``every_s`` passed since the last round; True when
        it scraped."""
        now = time.time() if now is None else now
        if now - self._last < self.every_s:
            return False
        self._last = now
        live = {(e["name"], e["pid"]): e for e in registered(self.home)}
        self.services = {key: s for key, s in self.services.items() if key in live}
        for key, entry in live.items():
            service = self.services.setdefault(key, Service(entry["name"], entry["pid"],
                                                            entry["url"]))
            self._scrape(service, now)
        return True

    def _scrape(self, service: Service, now: float) -> None:
        self.scrapes += 1
        try:
            samples = self._get(service.url)
        except (OSError, ValueError) as e:  # refused, timed out, not the text format
            service.up, service.error = False, f"{type(e).__name__}: {e}"
            return
        before, then = service.samples, service.at
        service.up, service.error, service.samples, service.at = True, "", samples, now
        if not before or now <= then:
            return
        service.handled_per_s = max(0.0, handled(samples) - handled(before)) / (now - then)
        service.rates.append((now, service.handled_per_s))
        new, old = buckets(samples, "destra_handler_seconds"), buckets(
            before, "destra_handler_seconds")
        window = {le: count - old.get(le, 0.0) for le, count in new.items()}
        p50, p99 = quantile(0.5, window), quantile(0.99, window)
        if p50 is not None and p99 is not None:  # else keep the last window's figures
            service.p50_ms, service.p99_ms = 1000 * p50, 1000 * p99

    def view(self) -> dict[str, Any]:
        """What the network page shows: one row per service, dead letters by reason,
        balances, and each service's handled-per-second series."""
        rows: list[dict[str, Any]] = []
        dead: dict[str, float] = {}
        money: dict[str, int] = {}
        for s in sorted(self.services.values(), key=lambda s: (s.name, s.pid)):
            lag = total(s.samples, "destra_consumer_lag")
            dl = total(s.samples, "destra_dead_letters_total")
            for _, labels, value in (x for x in s.samples
                                     if x[0] == "destra_dead_letters_total"):
                dead[labels["reason"]] = dead.get(labels["reason"], 0.0) + value
            for _, labels, value in (x for x in s.samples if x[0] == "destra_ledger_micro"):
                money[labels["account"]] = int(value)
            rows.append({"name": s.name, "pid": s.pid, "url": s.url, "up": s.up,
                         "error": s.error, "handled_per_s": s.handled_per_s,
                         "handled": handled(s.samples),
                         "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "lag": lag,
                         "dead_letters": dl, "rates": list(s.rates)})
        return {"services": rows, "dead_by_reason": dead, "ledger_micro": money}
