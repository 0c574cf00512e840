"""Runs the ledger projection against the broker: live, and as a replay from offset 0.

    python -m ledger.service [--idle-exit SECONDS] [--schema SCHEMA]

reads ``DESTRA_*`` settings (``DESTRA_KAFKA_BOOTSTRAP``, ``DESTRA_PG_DSN`` or
the state of ``destra infra up``) and projects until stopped (SIGTERM) or idle.
The one projector process runs two projections side by side, each in its own
thread with its own consumer, connection and stored offsets: the ledger
(``ledger.projection``) and the task and node views (``ledger.views``).
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from destra.settings import Settings
from ledger.projection import LedgerProjection, OffsetProjection
from ledger.views import TASK_STATUSES, ViewProjection, view_topics
from streams import metrics
from streams.authority import Genesis
from streams.consumer import Delivery, EventConsumer
from streams.klog import setup_logging
from streams.reading import end_offsets
from streams.topics import topic_for

BATCH = 500
TASKS_CACHE_S = 2.0
"""A scrape within this long of the last one reuses its task counts."""


class TaskCounts:
    """``destra_tasks{status}``: the tasks of the task view by status, counted in Postgres
    when scraped (at most every ``TASKS_CACHE_S``), on a connection of its own. The
    projector, not the allocator or the verifier, because it alone holds every task's
    status for ever (the processors forget closed tasks, and the verifier is sharded
    across workers), and counting on a scrape costs the hot path nothing."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema
        self._lock = threading.Lock()
        self._at = 0.0
        self._counts: dict[tuple[str, ...], float] = {}

    def read(self) -> dict[tuple[str, ...], float]:
        import psycopg
        from psycopg import sql

        with self._lock:
            if time.monotonic() - self._at < TASKS_CACHE_S:
                return self._counts
            counts = dict.fromkeys(TASK_STATUSES, 0)
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                rows = conn.execute(sql.SQL("SELECT status, count(*) FROM {}.task_view "
                                            "GROUP BY status").format(
                    sql.Identifier(self.schema))).fetchall()
            counts.update({str(status): int(n) for status, n in rows})
            self._counts = {(status,): float(n) for status, n in counts.items()}
            self._at = time.monotonic()
            return self._counts


def ledger_topic(settings: Settings) -> str:
    """The topic the ledger projection folds."""
    return topic_for("LedgerEntryPosted").name(settings.topic_prefix)


def project(settings: Settings, bootstrap: str, projection: OffsetProjection, *,
            idle_exit_s: float | None = None, until: dict[tuple[str, int], int] | None = None,
            running: Any = None, topics: Sequence[str] | None = None) -> int:
    """Consume and apply in batches; stop when idle, past ``until`` offsets, or told to.

    Reads ``topics`` (default: the ledger's) from the offsets the projection stored.
    Authority events (ledger entries, verdicts, assignments...) without a valid service
    signature are dead-lettered by the consumer, never applied: the genesis file
    ``settings.genesis_path`` must exist.
    """
    positions = projection.positions()
    group = f"{settings.topic_prefix}projector.{projection.name}-{projection.schema}"
    consumer = EventConsumer(
        settings, bootstrap, group, list(topics or [ledger_topic(settings)]),
        overrides={"enable.auto.commit": False},
        start_at=lambda t, p: positions.get((t, p)),
        genesis=Genesis.load(settings.genesis_path),
    )
    applied = 0
    last = time.monotonic()
    projected = metrics.PROJECTED.labels(projection.name or type(projection).__name__)
    try:
        while running is None or running():
            batch: list[Delivery] = []
            while len(batch) < BATCH:
                # Reading to ``until``, a quiet poll is short: the end may be reached.
                d = consumer.poll(0.2 if batch else 0.05 if until is not None else 1.0)
                if d is None:
                    break
                batch.append(d)
            passed = consumer.take_passed()
            if batch or passed:
                # Past what the consumer dead-lettered too: a restart does not read it again.
                applied += projection.apply(batch, consumer.refuse, passed)
                projected.inc(len(batch))
                positions.update({(d.topic, d.partition): d.offset + 1 for d in batch})
            if batch:
                last = time.monotonic()
            if until is not None and not batch and consumer.caught_up(until):
                break
            if idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                break
    finally:
        consumer.close()
    return applied


def project_to_now(settings: Settings, bootstrap: str, projection: OffsetProjection, *,
                   topics: Sequence[str] | None = None, timeout_s: float = 300.0) -> int:
    """``project`` every record committed on ``topics`` (default: the ledger's) when called,
    and stop there: no idle wait."""
    names = list(topics or [ledger_topic(settings)])
    ends = {key: end for name in names for key, end in end_offsets(bootstrap, name).items()}
    deadline = time.monotonic() + timeout_s
    return project(settings, bootstrap, projection, until=ends, topics=names,
                   running=lambda: time.monotonic() < deadline)


def project_views(settings: Settings, bootstrap: str, projection: ViewProjection,
                  **options: Any) -> int:
    """``project`` over the topics of the task and node views."""
    return project(settings, bootstrap, projection, topics=view_topics(settings), **options)


@dataclass(frozen=True)
class ReplayReport:
    """A rebuilt projection compared with the live one."""

    schema: str
    entries: int
    live_hash: str
    replay_hash: str

    @property
    def matches(self) -> bool:
        """True when the rebuild gives exactly the live ledger."""
        return self.live_hash == self.replay_hash


def replay(settings: Settings, bootstrap: str, dsn: str, live_schema: str = "public",
           timeout_s: float = 300.0) -> ReplayReport:
    """Rebuild the ledger from offset 0 into a fresh schema and compare with the live one.

    Both are brought to the same offsets (the topic's end now) before comparing.
    """
    ends = end_offsets(bootstrap, ledger_topic(settings))
    deadline = time.monotonic() + timeout_s

    def in_time() -> bool:
        return time.monotonic() < deadline

    live = LedgerProjection(dsn, live_schema)
    fresh = LedgerProjection(dsn, f"ledger_replay_{uuid.uuid4().hex[:8]}")
    try:
        project(settings, bootstrap, live, until=ends, running=in_time)
        project(settings, bootstrap, fresh, until=ends, running=in_time)
        entries = fresh.check()
        live.check()
        return ReplayReport(fresh.schema, entries, live.content_hash(), fresh.content_hash())
    finally:
        live.close()
        fresh.close()


def run_together(jobs: dict[str, Callable[[], object]], stop: threading.Event) -> None:
    """Run jobs in threads until all return; the first failure stops the others and is raised.

    The calling (main) thread only waits, in short slices, so signal handlers run.
    Jobs are expected to watch ``stop``.
    """
    errors: list[BaseException] = []

    def guarded(job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as e:  # handed to the main thread below
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=guarded, args=(job,), name=name)
               for name, job in jobs.items()]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    except BaseException:  # Ctrl-C: let the projections finish their batch and stop
        stop.set()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]


def main() -> None:
    """Run the live ledger and view projections until SIGTERM (or idle, with --idle-exit)."""
    from infra import services

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle-exit", type=float, default=None)
    parser.add_argument("--schema", default="public")
    args = parser.parse_args()
    setup_logging()
    settings = Settings.from_env()
    state = services.read_state(settings)
    bootstrap = settings.kafka_bootstrap or (state.kafka_bootstrap if state else None)
    dsn = settings.pg_dsn or (state.pg_dsn if state else None)
    if not bootstrap or not dsn:
        raise SystemExit("ledger: no Kafka or Postgres; run `destra infra up` or set DESTRA_*")
    services.use_service_access(settings, "projector")
    metrics.register(metrics.Collected("destra_tasks", "Tasks of the task view by status",
                                       ["status"], TaskCounts(dsn, args.schema).read))
    metrics.serve(settings.producer_id or "projector", settings.home)
    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    ledger = LedgerProjection(dsn, args.schema)
    views = ViewProjection(dsn, args.schema)

    def running() -> bool:
        return not stop.is_set()

    try:
        run_together({
            "ledger": lambda: project(settings, bootstrap, ledger, idle_exit_s=args.idle_exit,
                                      running=running),
            "views": lambda: project_views(settings, bootstrap, views,
                                           idle_exit_s=args.idle_exit, running=running),
        }, stop)
    finally:
        ledger.close()
        views.close()


if __name__ == "__main__":
    main()
