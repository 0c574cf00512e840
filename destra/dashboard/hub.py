"""The dashboard's one reader of the network: a poller of the Postgres views and a follower
of the few Kafka topics the views do not fold.

However many browsers are open, the server asks Postgres one statement per tick (at most
one a second, ``Hub.queries`` counts them) and keeps what it read in memory; every page
and every server-sent-events stream is answered from there. The statement first reads
the projections' offsets (``projection_offsets``): while they have not moved, the
views have not changed and the rest of the statement is not evaluated.

One Kafka consumer, assigned (no consumer group) to the prices, governance, dead-letter,
assignment and reveal topics from their start, folds what the views do not hold: prices
per tier over time, proposals, dead letters with their reasons, and the allocator's
predicted runtime of each replica against the runtime its node reported.

The services' own figures (events handled per second, handler latency, consumer lag, dead
letters by reason, the ledger's balances) come from their Prometheus ``/metrics``, scraped
by a ``Scraper`` over HTTP: the dashboard plots the same numbers Prometheus would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from destra.dashboard.services import Scraper
from destra.errors import DestraError

TICK_S = 1.0
"""The poller reads Postgres at most once per tick."""
RECENT = 200
"""The newest tasks kept in memory (the tasks page); others are read when asked for."""
PIN_S = 600.0
"""How long a task asked for by its page stays in the statement's pinned ids."""
KEPT = 2000
"""Events kept per kind from Kafka (prices, dead letters, runtime pairs)."""

_STATEMENT = """
WITH sig AS (
  SELECT coalesce(string_agg(projection || '/' || topic || '/' || partition || '='
                             || next_offset, ',' ORDER BY projection, topic, partition), '')
         AS s
  FROM projection_offsets),
recent AS (
  SELECT * FROM task_view
  ORDER BY coalesce(submitted_at, assigned_at, verified_at) DESC NULLS LAST, task_id DESC
  LIMIT %(recent)s),
shown AS (
  SELECT * FROM recent UNION SELECT * FROM task_view WHERE task_id = ANY(%(pinned)s)),
done AS (
  SELECT t.task_id, t.submitted_at, t.assigned_at, t.verified_at,
         (SELECT min(r.committed_at - r.assigned_at) FROM task_replica_view r
          WHERE r.task_id = t.task_id) AS to_commit,
         (SELECT min(r.revealed_at - r.committed_at) FROM task_replica_view r
          WHERE r.task_id = t.task_id) AS to_reveal,
         (SELECT t.verified_at - max(r.revealed_at) FROM task_replica_view r
          WHERE r.task_id = t.task_id) AS to_verdict
  FROM task_view t WHERE t.verified_at IS NOT NULL
  ORDER BY t.verified_at DESC LIMIT 1000)
SELECT sig.s, CASE WHEN sig.s IS DISTINCT FROM %(last)s OR %(force)s THEN json_build_object(
  'now', (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
  'tasks', (SELECT coalesce(json_agg(json_build_object(
      'task_id', task_id, 'submitter_id', submitter_id, 'workload', workload,
      'params', params, 'replicas', replicas, 'quorum', quorum,
      'compute_units', compute_units, 'price_micro', price_micro, 'tier', tier,
      'status', status, 'submitted_at', submitted_at, 'assigned_at', assigned_at,
      'verified_at', verified_at, 'digest', encode(digest, 'hex'),
      'failure_reason', failure_reason, 'failure_detail', failure_detail,
      'assignments', assignments, 'commits', commits, 'reveals', reveals,
      'paid_micro', paid_micro, 'refunded_micro', refunded_micro)), '[]')
    FROM shown),
  'replicas', (SELECT coalesce(json_agg(r ORDER BY r.task_id, r.replica_index NULLS LAST,
                                        r.attempt, r.node_id), '[]')
    FROM task_replica_view r WHERE r.task_id IN (SELECT task_id FROM shown)),
  'status_counts', (SELECT coalesce(json_object_agg(status, n), '{}')
    FROM (SELECT status, count(*) AS n FROM task_view GROUP BY status) c),
  'failures', (SELECT coalesce(json_object_agg(reason, n), '{}')
    FROM (SELECT coalesce(failure_reason, '?') AS reason, count(*) AS n FROM task_view
          WHERE status = 'failed' GROUP BY 1) f),
  'penalties', (SELECT coalesce(json_object_agg(reason, n), '{}')
    FROM (SELECT penalized_reason AS reason, count(*) AS n FROM task_node_facts
          WHERE penalized_reason IS NOT NULL GROUP BY 1) p),
  'nodes', (SELECT coalesce(json_agg(n ORDER BY n.node_id), '[]') FROM node_view n),
  'verdicts', (SELECT coalesce(json_agg(json_build_array(b, n) ORDER BY b), '[]')
    FROM (SELECT (verified_at / 10000) * 10000 AS b, count(*) AS n FROM task_view
          WHERE verified_at >= (extract(epoch FROM clock_timestamp()) * 1000)::bigint - 600000
          GROUP BY 1) v),
  'hops', (SELECT json_build_object(
      'submission to assignment', percentile_cont(0.5) WITHIN GROUP
          (ORDER BY assigned_at - submitted_at),
      'assignment to commit', percentile_cont(0.5) WITHIN GROUP (ORDER BY to_commit),
      'commit to reveal', percentile_cont(0.5) WITHIN GROUP (ORDER BY to_reveal),
      'reveal to verdict', percentile_cont(0.5) WITHIN GROUP (ORDER BY to_verdict),
      'submission to verdict', percentile_cont(0.5) WITHIN GROUP
          (ORDER BY verified_at - submitted_at),
      'p90 submission to verdict', percentile_cont(0.9) WITHIN GROUP
          (ORDER BY verified_at - submitted_at)) FROM done),
  'earnings', (SELECT coalesce(json_agg(json_build_array(account, b, amount)
                                        ORDER BY account, b), '[]')
    FROM (SELECT account, (occurred_at / 10000) * 10000 AS b, sum(amount_micro) AS amount
          FROM ledger_entries WHERE kind = 'payout' AND account IN
            (SELECT 'node:' || node_id FROM node_view
             ORDER BY earned_micro DESC, node_id LIMIT 8)
          GROUP BY 1, 2) e)
) END
FROM sig
"""


@dataclass
class Snapshot:
    """What the views said at the last tick that changed them, and what Kafka said."""

    version: int = 0
    views: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    recent: list[str] = field(default_factory=list)
    queue: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=600))
    prices: list[tuple[int, str, int]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)
    runtimes: list[dict[str, Any]] = field(default_factory=list)
    proposals: list[dict[str, Any]] = field(default_factory=list)
    disputes: int = 0
    services: dict[str, Any] = field(default_factory=dict)
    """The services' own ``/metrics``, scraped (``destra.dashboard.services``)."""
    read_at: float = 0.0


class Follower:
    """One Kafka consumer thread folding the topics the views lack, from their start."""

    def __init__(self, bootstrap: str, prefix: str, genesis_path: Path | None) -> None:
        self.bootstrap, self.prefix = bootstrap, prefix
        self._genesis_path = genesis_path
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.changes = 0
        self.prices: deque[tuple[int, str, int]] = deque(maxlen=KEPT)
        self.dead: deque[dict[str, Any]] = deque(maxlen=KEPT)
        self.governance: list[Any] = []
        self._predicted: dict[tuple[str, str, int], tuple[int, str]] = {}
        self.pairs: deque[dict[str, Any]] = deque(maxlen=KEPT)
        self.disputes = 0
        self.error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dashboard-kafka", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def state(self) -> tuple[int, dict[str, Any]]:
        """(changes so far, copies of what was folded)."""
        with self._lock:
            return self.changes, {
                "prices": list(self.prices), "dead": list(self.dead),
                "governance": list(self.governance), "pairs": list(self.pairs),
                "disputes": self.disputes}

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from schemas import decode
        from streams.authority import Genesis
        from streams.consumer import consumer_config
        from streams.topics import topic_for

        genesis = (Genesis.load(self._genesis_path)
                   if self._genesis_path is not None and self._genesis_path.exists() else None)
        names = ["PriceUpdated", "ProposalSubmitted", "DeadLettered", "TaskAssigned",
                 "ResultRevealed"]
        topics = list(dict.fromkeys(topic_for(n).name(self.prefix) for n in names))
        consumer = Consumer(consumer_config(self.bootstrap, f"dashboard-{uuid.uuid4()}", {
            "enable.auto.commit": False}))
        try:
            assignment: list[TopicPartition] = []
            while not assignment and not self._stop.is_set():
                metadata = consumer.list_topics(timeout=10)
                assignment = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics
                              if t in metadata.topics for p in metadata.topics[t].partitions]
                if not assignment:
                    self._stop.wait(1.0)
            consumer.assign(assignment)
            while not self._stop.is_set():
                msgs = consumer.consume(500, 0.2)
                if not msgs:
                    continue
                with self._lock:
                    for msg in msgs:
                        if msg.error() is not None:
                            continue
                        try:
                            event = decode(msg.value() or b"")
                            if genesis is not None:
                                event = genesis.require(event)
                        except DestraError:
                            continue
                        self._fold(event)
                    self.changes += 1
        except Exception as e:  # noqa: BLE001 - shown on the pages, not fatal to them
            self.error = f"{type(e).__name__}: {e}"
        finally:
            consumer.close()

    def _fold(self, event: Any) -> None:
        f, name = event.fields, event.name
        if name == "PriceUpdated":
            self.prices.append((int(f["effective_at"]), str(f["tier"]),
                                int(f["price_per_unit_micro"])))
        elif name in ("ProposalSubmitted", "VoteCast", "ProposalDecided"):
            self.governance.append(event)
        elif name == "DeadLettered":
            self.dead.append({"at": event.occurred_at, "topic": f["source_topic"],
                              "partition": f["source_partition"], "offset": f["source_offset"],
                              "error": f["error"], "reason": f["reason"]})
        elif name == "TaskAssigned":
            if f["segment"] >= 0:
                self.disputes += 1
            key = (f["task_id"], f["node_id"], f["attempt"])
            self._predicted[key] = (int(f["predicted_runtime_ms"]), str(f["workload"]))
            if len(self._predicted) > 4 * KEPT:
                for old in list(self._predicted)[:KEPT]:
                    del self._predicted[old]
        elif name == "ResultRevealed":
            key = (f["task_id"], f["node_id"], f["attempt"])
            if key in self._predicted:
                predicted, workload = self._predicted.pop(key)
                self.pairs.append({"task_id": key[0], "node_id": key[1], "workload": workload,
                                   "predicted_ms": predicted, "actual_ms": int(f["runtime_ms"])})


Renderer = Callable[[Snapshot, list[str]], dict[str, dict[str, Any]]]
"""Makes every page part of a snapshot, given the pinned task ids (``pages.render``)."""


class Hub:
    """The poller: one statement per tick at most, the result kept for every reader."""

    def __init__(self, dsn: str, *, schema: str = "public", follower: Follower | None = None,
                 tick_s: float = TICK_S, recent: int = RECENT,
                 render: Renderer | None = None, scraper: Scraper | None = None) -> None:
        self.dsn, self.schema, self.follower, self.scraper = dsn, schema, follower, scraper
        self.tick_s, self.recent = tick_s, recent
        self.queries = 0
        """Statements sent to Postgres since the start: at most one per tick."""
        self.ticks = 0
        self.streams = 0
        self.statement_ms = 0.0
        """How long the last statement that read the views took (with its fetch)."""
        self.render_ms = 0.0
        """How long rendering the last snapshot's pages took."""
        """Event streams open now (the app counts them)."""
        self.started = time.monotonic()
        self.snapshot = Snapshot()
        self.parts: dict[str, str] = {}
        """Each page part's latest content, serialized once for every stream."""
        self.fragments: dict[str, dict[str, Any]] = {}
        self._render = render
        self._pinned: dict[str, float] = {}
        self._sig: str | None = None
        self._follower_seen = -1
        self._conn: psycopg.Connection[Any] | None = None
        self._changed: asyncio.Event | None = None
        """Set (and replaced) at each new snapshot; its waiters are the open streams."""
        self._task: asyncio.Task[None] | None = None
        self.error: str | None = None

    # -- lifecycle (in the server's event loop) -----------------------------------

    async def start(self) -> None:
        self._changed = asyncio.Event()
        if self.follower is not None:
            self.follower.start()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        if self._conn is not None:
            self._conn.close()

    async def _loop(self) -> None:
        while True:
            began = time.monotonic()
            try:
                changed = await asyncio.to_thread(self._tick)
                self.error = None
            except (psycopg.Error, DestraError) as e:
                self.error = f"{type(e).__name__}: {e}"
                changed = False
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            if changed:
                assert self._changed is not None
                fired, self._changed = self._changed, asyncio.Event()
                fired.set()
            await asyncio.sleep(max(0.0, self.tick_s - (time.monotonic() - began)))

    async def wait_change(self, version: int, timeout_s: float) -> int:
        """The snapshot's version once it passes ``version`` (or after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while self.snapshot.version <= version and time.monotonic() < deadline:
            assert self._changed is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        return self.snapshot.version

    async def task(self, task_id: str) -> dict[str, Any] | None:
        """A task's row and replicas from memory; one not there yet is pinned and read at
        the next tick (this never queries Postgres itself)."""
        self._pinned[task_id] = time.monotonic()
        if task_id in self.snapshot.tasks:
            return self.snapshot.tasks[task_id]
        self._sig = None  # read it at the next tick even if the views did not move
        deadline = time.monotonic() + 3 * self.tick_s
        version = self.snapshot.version
        while task_id not in self.snapshot.tasks and time.monotonic() < deadline:
            version = await self.wait_change(version, deadline - time.monotonic())
        return self.snapshot.tasks.get(task_id)

    @property
    def pinned(self) -> list[str]:
        """The task ids whose pages were asked for lately."""
        return list(self._pinned)

    def pin(self, task_id: str) -> None:
        """Keep ``task_id`` in the statement while its page is open."""
        self._pinned[task_id] = time.monotonic()

    def stats(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        return {"queries": self.queries, "ticks": self.ticks, "version": self.snapshot.version,
                "uptime_s": round(elapsed, 3),
                "queries_per_s": round(self.queries / elapsed, 3) if elapsed else 0.0,
                "pinned": len(self._pinned), "streams": self.streams,
                "statement_ms": round(self.statement_ms, 1),
                "render_ms": round(self.render_ms, 1), "error": self.error,
                "kafka_error": self.follower.error if self.follower else None}

    # -- one tick (in a worker thread) --------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True,
                                         options=f"-c search_path={self.schema}")
        return self._conn

    def _tick(self) -> bool:
        self.ticks += 1
        now = time.monotonic()
        self._pinned = {t: at for t, at in self._pinned.items() if now - at < PIN_S}
        conn = self._connect()
        self.queries += 1
        began = time.perf_counter()
        row = conn.execute(_STATEMENT, {  # type: ignore[call-overload]
            "recent": self.recent, "pinned": list(self._pinned), "last": self._sig,
            "force": self._sig is None}).fetchone()
        assert row is not None
        sig, data = row
        if data is not None:
            self.statement_ms = 1000 * (time.perf_counter() - began)
        views_moved = data is not None
        follower_moved = False
        kafka: dict[str, Any] = {}
        if self.follower is not None:
            seen, kafka = self.follower.state()
            follower_moved = seen != self._follower_seen
            self._follower_seen = seen
        scraped = self.scraper is not None and self.scraper.poll()
        if (not views_moved and not follower_moved and not scraped
                and self.snapshot.version > 0):
            return False
        self._sig = sig
        old = self.snapshot
        snap = Snapshot(version=old.version + 1, queue=old.queue, read_at=time.time(),
                        services=self.scraper.view() if scraped and self.scraper
                        else old.services)
        if views_moved:
            snap.views = data
            replicas: dict[str, list[dict[str, Any]]] = {}
            for r in data["replicas"]:
                replicas.setdefault(r["task_id"], []).append(r)
            tasks = {}
            for t in data["tasks"]:
                t["replica_rows"] = replicas.get(t["task_id"], [])
                tasks[t["task_id"]] = t
            snap.tasks = tasks
            snap.recent = [t["task_id"] for t in sorted(
                data["tasks"], key=lambda t: (t["submitted_at"] or t["assigned_at"]
                                              or t["verified_at"] or 0, t["task_id"]),
                reverse=True)][: self.recent]
            counts = data["status_counts"]
            snap.queue.append((int(data["now"]),
                               int(counts.get("submitted", 0)) + int(counts.get("escrowed", 0))))
        else:
            snap.views, snap.tasks, snap.recent = old.views, old.tasks, old.recent
        if self.follower is not None:
            snap.prices = kafka["prices"]
            snap.dead = kafka["dead"]
            snap.runtimes = kafka["pairs"]
            snap.disputes = kafka["disputes"]
            from destra.governance_client import fold_proposals

            snap.proposals = fold_proposals(kafka["governance"])
        if self._render is not None:
            began = time.perf_counter()
            fragments = self._render(snap, self.pinned)
            self.fragments = fragments
            self.parts = {name: json.dumps(part, separators=(",", ":"), default=str)
                          for name, part in fragments.items()}
            self.render_ms = 1000 * (time.perf_counter() - began)
        self.snapshot = snap
        return True
