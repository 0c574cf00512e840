"""The Kafka runner of the processing contract: exactly-once, batched, state that survives SIGKILL.

One loop for every network service (the allocator, the verifier, the ledger
decider): it reads the topics carrying the processors' ``inputs`` in one
consumer group, and for each batch of records, in one Kafka transaction,

* hands each decoded record that passes the authority check (``Genesis``) to
  every processor that reads its type, with ``Context.now_ms`` the record's
  timestamp (the broker's append time on ``broker_time`` topics);
* ticks the processors with the wall clock every ``tick_ms``;
* produces what they emit, signed with the service key of the role that may
  emit each type, and dead-letters what they refused, with the reason;
* writes the state record of the group to the compacted ``processors.state``
  topic: the input positions after the batch and a snapshot of each
  ``Recovery.SNAPSHOT`` processor, signed with the service's key.

A crash before the commit shows none of it to ``read_committed`` readers and
the inputs are read again; a crash after it never re-reads them. A restart
first fences its killed predecessor (``init_transactions``), then restores
the latest state record, which is exactly the state and positions after the
last committed batch, and reads on from there: the cost of a restart is one
snapshot, not the length of history. The positions travel in the record, as
pyeventsourcing records its tracking position with the new events, so a
batch costs no ``AddOffsetsToTxn`` / ``TxnOffsetCommit`` round trips and the
consumer needs no group membership (it is assigned every input partition).

Nothing waits on a timer between a record's arrival and its handler: the
consumer returns as soon as one record is there (``streams.consumer.fetch``)
and a batch is whatever has arrived meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import pickle  # noqa: S403 - only ever loads snapshots this service signed (checked first)
import random
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from destra.settings import Settings
from schemas import Event, decode
from schemas.codec import encode_unchecked
from schemas.errors import EventError, StateError
from schemas.events import now_ms
from schemas.signatures import KeyPair, verify
from streams.consumer import consumer_config, dead_letter, fetch, letter, where
from streams.journal import ExpiringLog, Journaled
from streams.klog import KAFKA_LOG, task_extra
from streams.leases import Shard, task_topics
from streams.metrics import (
    BATCHES,
    CONSUMER_LAG,
    LAG_EVERY_S,
    Instruments,
    dead_lettered,
    reason_code,
)
from streams.processing import Context, Origin, Outcome, Processor, Recovery
from streams.producer import EventProducer, RecordTooLarge
from streams.topics import (
    DEAD_LETTER,
    JOURNAL,
    STATE,
    TASK_PARTITIONS,
    partition_for,
    topic_for,
)

log = logging.getLogger(__name__)
task_log = logging.getLogger("destra.tasks")
"""One line per decision about a task a runner emits (placements, verdicts, reissues,
penalties), with its ``task_id``: logged here, once, as the outputs are produced, not in
the pure handlers (which a rewind runs again)."""

_TASK_LINES: dict[str, tuple[str, ...]] = {
    "TaskAssigned": ("node_id", "replica_index", "attempt"),
    "TaskVerified": ("quorum",),
    "TaskFailed": ("reason", "detail"),
    "ReissueRequested": ("replica_index", "attempt"),
    "NodePenalized": ("node_id", "reason", "slash_micro"),
}

SNAPSHOT_MAGIC = b"DSNP2"
"""``DSNP2``: the pickle as it is, compressed on the way by the producer (lz4, in
librdkafka's thread). ``DSNP1`` records (zlib level 1, in the batch's critical path:
about 3-4 ms a batch for the verifier's state) are still read."""
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
MAX_PHASES = 200_000
JOURNAL_MARGIN_MS = 600_000
"""A rebuild reads the journal from this long before the logs' horizon, counted back from
the clock of the last committed batch: an entry added then expired before any record a
restarted runner can still read (clocks, late records)."""


def latest_record(bootstrap: str, state_topic: str, key: str, group: str) -> bytes | None:
    """The last committed state record under ``key``, reading back from the topic's end
    (sealed: ``open_snapshot`` it)."""
    consumer = Consumer(consumer_config(bootstrap, group, {"enable.auto.commit": False}))
    try:
        tp = TopicPartition(state_topic, 0)
        low, high = _watermarks(consumer, tp)
        back = 16
        while True:
            start = max(low, high - back)
            found = KafkaRunner._read_range(consumer, tp, start, high)
            if key in found or start == low:
                return found.get(key)
            back *= 4
    finally:
        consumer.close()


def seal_snapshot(state: Any, keys: KeyPair) -> bytes:
    """``DSNP2``, the service's Ed25519 signature, then the pickled state."""
    body = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    return SNAPSHOT_MAGIC + keys.sign(body) + body


def open_snapshot(data: bytes, public_key: bytes) -> Any:
    """The state in a sealed snapshot; ``StateError`` unless the service key signed it."""
    head = len(SNAPSHOT_MAGIC)
    magic = data[:head]
    if magic not in (b"DSNP1", SNAPSHOT_MAGIC) or len(data) < head + 64:
        raise StateError("not a Destra state snapshot")
    signature, body = data[head:head + 64], data[head + 64:]
    if not verify(public_key, body, signature):
        raise StateError("state snapshot not signed by this service's key: refused")
    if magic == b"DSNP1":
        body = zlib.decompress(body)
    return pickle.loads(body)  # noqa: S301 - signed by us, checked above


@dataclass
class RunStats:
    """What a run did, for benches and tests."""

    batches: int = 0
    records: int = 0
    emitted: int = 0
    rejected: int = 0
    snapshots: int = 0
    restored: dict[str, int] = field(default_factory=dict)
    """Per processor, the size in bytes of the snapshot it restarted from."""
    restore_ms: float = 0.0
    journal_entries: int = 0
    """Expiring-log entries a restart read back from the journal."""
    phases: list[tuple[int, int, int, float, float, float, float, float]] = field(
        default_factory=list)
    """Only when the runner has ``timings`` (benches): per committed transaction (the first
    ``MAX_PHASES``), (wall ms at its fetch, records, bytes of the state and journal records,
    ms from the oldest record's append to its fetch, handling, state record, sending,
    commit): where a hop's time goes inside this runner (bench/lifecycle.py prints their
    percentiles)."""
    arrivals: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Per input topic, (wall ms at fetch, ms from the record's timestamp to its fetch) of
    each record of those transactions."""


Check = Callable[[Event], str | None]
Sign = Callable[[Event], Event]


@dataclass
class KafkaRunner:
    """Runs ``processors`` on the broker; see the module docstring."""

    settings: Settings
    bootstrap: str
    processors: Sequence[Processor]
    group: str
    """Consumer group and transactional id: one live instance per group (a restarted one
    fences its killed predecessor)."""
    snapshot_keys: KeyPair
    """Signs this group's snapshots (the service's own key); only it can restore them."""
    sign: Sign = lambda e: e
    """Signs each emitted event as the service allowed to emit it."""
    check: Check | None = None
    """The authority check every input passes first (``Genesis.check``)."""
    tick_ms: int = 50
    batch: int = 500
    poll_s: float = 0.05
    checkpoint: Callable[[dict[tuple[str, int], int]], Any] | None = None
    """For a ``Recovery.REPLAY`` processor: its state as of the end of the current batch,
    given the input positions after it; written signed under ``<group>/checkpoint`` every
    ``checkpoint_every_s`` in the batch's transaction, so its rebuild replays only what
    came after (``latest_checkpoint``)."""
    checkpoint_every_s: float = 30.0
    prepare: Callable[[], None] | None = None
    """Run after fencing the predecessor and before restoring: a ``Recovery.REPLAY``
    processor's rebuild. Fencing first matters: a killed instance's open transaction
    holds back every read_committed reader of its topics until it is aborted."""
    producer_overrides: Mapping[str, Any] = field(default_factory=dict)
    """librdkafka settings for the transactional producer, over the runner's own."""
    crash_before_commit: int = 0
    """Failpoint for crash tests: SIGKILL this process in its n-th batch, the batch's
    events delivered and its transaction open, the worst moment to lose it."""
    shard: Shard | None = None
    """A verifier shard (``streams.leases``): read only its partitions of the task topics,
    and of the other topics only the events of its own tasks. A record on a task topic
    whose task belongs to another partition is dead-lettered as misrouted: no shard but
    this one reads it there."""
    timings: str | None = field(default_factory=lambda: os.environ.get("DESTRA_TIMINGS"))
    """A directory: on exit, ``stats.phases`` is written there as ``<group>.json``
    (benches; ``DESTRA_TIMINGS`` by default)."""
    stats: RunStats = field(default_factory=RunStats)

    def __post_init__(self) -> None:
        self.rng = random.SystemRandom()
        self.inputs = sorted({topic_for(name).name(self.settings.topic_prefix)
                              for p in self.processors for name in p.inputs})
        self.state_topic = STATE.name(self.settings.topic_prefix)
        self.dead_topic = DEAD_LETTER.name(self.settings.topic_prefix)
        self._by_name: dict[str, list[Processor]] = {}
        for p in self.processors:
            for name in p.inputs:
                self._by_name.setdefault(name, []).append(p)
        self._snapshotting = [p for p in self.processors if p.recovery == Recovery.SNAPSHOT]
        self._journaled = [p for p in self._snapshotting if isinstance(p, Journaled)]
        self.journal_topic = JOURNAL.name(self.settings.topic_prefix)
        self._journal_partition = partition_for(self.group, JOURNAL.partitions)
        for log in self._logs().values():
            log.track()
        self._seen_ms = 0
        """The latest record time read, or tick time: the clock never goes back."""
        self._pickled: dict[str, bytes] = {}
        """Each snapshotting processor's latest pickled state."""
        self._positions: dict[tuple[str, int], int] = {}
        """The next offset to read of each input partition, as of the last batch."""
        self._assigned: list[TopicPartition] = []
        self._checkpointed = time.monotonic()
        self._fetched, self._fetched_ms = time.perf_counter(), now_ms()
        self._task_topics = task_topics(self.settings.topic_prefix)
        self._metrics = Instruments()
        self._batches = BATCHES.labels(self.group)
        self._lag_at = 0.0
        self.ready = threading.Event()
        """Set once ``run`` has fenced its predecessor, restored its state and is reading."""

    # -- restart ----------------------------------------------------------------------------

    def restore(self) -> dict[tuple[str, int], int]:
        """Restore each snapshotting processor from the group's latest committed state
        record; the input positions that state is at (empty on a first start)."""
        started = time.perf_counter()
        data = self._latest_record(self.group)
        positions: dict[tuple[str, int], int] = {}
        if data is not None:
            record = open_snapshot(data, self.snapshot_keys.signing_public)
            positions = dict(record["positions"])
            for p in self._snapshotting:
                state = record["states"].get(p.name)
                if state is not None:
                    # Signed by this service's key with the record, checked above.
                    p.restore(pickle.loads(state))  # type: ignore[attr-defined]  # noqa: S301
                    self._pickled[p.name] = state
                    self.stats.restored[p.name] = len(state)
            if self._journaled:
                for log in self._logs().values():
                    log.track()  # a restore may have swapped a log for its own
                self._rebuild_journals(record.get("clock"))
        self.stats.restore_ms = (time.perf_counter() - started) * 1000
        return positions

    def _logs(self) -> dict[tuple[str, str], ExpiringLog]:
        return {(p.name, name): log for p in self._journaled
                for name, log in p.journals().items()}  # type: ignore[attr-defined]

    def _rebuild_journals(self, clock: int | None) -> None:
        """Refill the journaled processors' expiring logs from ``processors.journal``: every
        batch's additions since the logs' horizon (plus a margin) before ``clock``, the
        clock of the last committed batch; from the start of the journal without one."""
        logs = self._logs()
        horizon = max((log.horizon_ms for log in logs.values()), default=0)
        consumer = Consumer(consumer_config(self.bootstrap, f"{self.group}-restore",
                                            {"enable.auto.commit": False}))
        loaded = 0
        try:
            _topic_metadata(consumer, self.journal_topic, what="journal topic")
            tp = TopicPartition(self.journal_topic, self._journal_partition)
            low, high = _watermarks(consumer, tp)
            start = low
            if clock:
                (found,) = consumer.offsets_for_times(
                    [TopicPartition(tp.topic, tp.partition,
                                    max(0, clock - horizon - JOURNAL_MARGIN_MS))], timeout=30)
                start = found.offset if found.offset >= 0 else high
            mine = self.group.encode()
            for msg in _records(consumer, tp, max(low, start), high):
                if msg.key() != mine:
                    continue
                batch = open_snapshot(msg.value() or b"", self.snapshot_keys.signing_public)
                for where, entries in batch["logs"].items():
                    log = logs.get(tuple(where))
                    if log is not None:
                        log.load(entries)
                        loaded += len(entries)
        finally:
            consumer.close()
        self.stats.journal_entries = loaded
        for log in logs.values():
            log.commit()  # what is loaded is committed; nothing is pending

    def latest_checkpoint(self) -> Any | None:
        """The last committed ``checkpoint`` of this group, opened, or None."""
        data = self._latest_record(f"{self.group}/checkpoint")
        return None if data is None else open_snapshot(data, self.snapshot_keys.signing_public)

    def _latest_record(self, key: str) -> bytes | None:
        """The last committed state record under ``key``, reading back from the topic's end."""
        return latest_record(self.bootstrap, self.state_topic, key, f"{self.group}-restore")

    @staticmethod
    def _read_range(consumer: Consumer, tp: TopicPartition, start: int,
                    end: int) -> dict[str, bytes]:
        """The latest value of each key in ``tp`` from ``start`` to ``end``."""
        return {msg.key().decode(): msg.value() or b""  # type: ignore[union-attr]
                for msg in _records(consumer, tp, start, end) if msg.key() is not None}

    def _assign(self, consumer: Consumer, positions: dict[tuple[str, int], int]) -> None:
        """Read every partition of the inputs from the restored positions; a partition the
        record does not name starts at the group's committed offset (a network upgraded
        from group offsets), else at its beginning."""
        partitions = []
        for topic in self.inputs:
            meta = _topic_metadata(consumer, topic)
            mine = (self.shard.partitions() if self.shard is not None
                    and topic in self._task_topics else sorted(meta.partitions))
            partitions += [TopicPartition(topic, p) for p in mine]
        unknown = [tp for tp in partitions if (tp.topic, tp.partition) not in positions]
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in (_committed(consumer, unknown) if unknown else [])}
        start = []
        for tp in partitions:
            at = positions.get((tp.topic, tp.partition), committed.get((tp.topic, tp.partition)))
            start.append(TopicPartition(tp.topic, tp.partition,
                                        at if at is not None and at >= 0 else OFFSET_BEGINNING))
        self._positions = {k: v for k, v in positions.items() if v >= 0}
        self._assigned = partitions
        consumer.assign(start)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, running: Callable[[], bool] = lambda: True,
            idle_exit_s: float | None = None) -> RunStats:
        """Process until ``running()`` is false, or nothing arrives for ``idle_exit_s``."""
        producer = EventProducer(self.settings, self.bootstrap, {
            "transactional.id": self.group,
            # A batch's transaction takes milliseconds; a killed instance's open one holds
            # back read_committed readers of its topics until it is fenced by the next
            # instance or this times out.
            "transaction.timeout.ms": 15_000,
            "message.timeout.ms": 14_000,  # librdkafka: not above the transaction timeout
            "message.max.bytes": MAX_SNAPSHOT_BYTES + 1024 * 1024,
            "linger.ms": 0,
            # A transaction begun while the last one's markers are being written is
            # answered CONCURRENT_TRANSACTIONS and retried: librdkafka backs off
            # exponentially up to retry.backoff.max.ms (1 s by default), which put
            # 1.2 s into a hop's p99 (bench/runner_hop.py). Retry every few ms instead.
            "retry.backoff.ms": 2,
            "retry.backoff.max.ms": 10,
            **self.producer_overrides,
        }, sign_view=self.sign)
        # Fence a killed predecessor first: once this returns, its open transaction is
        # aborted and no record of it can commit after the state read below.
        producer.init_transactions()
        if self.prepare is not None:
            self.prepare()
        positions = self.restore()
        for p in self._snapshotting:  # the state a rewind goes back to before any batch
            if p.name not in self._pickled:
                self._pickled[p.name] = pickle.dumps(
                    p.snapshot(), protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[attr-defined]
        consumer = Consumer(consumer_config(self.bootstrap, self.group, {
            "enable.auto.commit": False, "logger": KAFKA_LOG,
            # The broker answers a waiting fetch as soon as a record is appended, and a
            # read_committed one as soon as the transaction's marker is (measured: 1-4 ms
            # from commit_transaction returning to consume). A short wait only makes every
            # idle runner fetch 100 times a second: at 10 ms the broker spent 50 ms of CPU
            # per task and light-load hops took 20-48 ms (p50); at 500, 39 ms and 9-16 ms
            # (bench/lifecycle.py, same run conditions).
            "fetch.wait.max.ms": 500, "fetch.queue.backoff.ms": 0,
        }))
        if self._journaled:
            # A network made by an older version has no journal topic: say so now, not
            # with a transaction that times out on its first journal record.
            _topic_metadata(consumer, self.journal_topic, what="journal topic")
        self._assign(consumer, positions)
        self.ready.set()
        last_tick, last_record = 0.0, time.monotonic()
        try:
            while running():
                batch = [m for m in fetch(consumer, self.batch, self.poll_s)
                         if m.error() is None]
                self._fetched, self._fetched_ms = time.perf_counter(), now_ms()
                if batch:
                    last_record = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s:
                    break
                tick_due = (time.monotonic() - last_tick) * 1000 >= self.tick_ms
                if not batch and not tick_due:
                    continue
                self._transaction(producer, consumer, batch, tick_due)
                if tick_due:
                    last_tick = time.monotonic()
                    if last_tick - self._lag_at >= LAG_EVERY_S:
                        self._lag_at = last_tick
                        self._measure_lag(consumer)
        finally:
            consumer.close()
            for topic in self.inputs:  # a unit leased away: its lag is another worker's
                try:
                    CONSUMER_LAG.remove(self.group, topic)
                except KeyError:
                    pass
            if self.timings:
                self._write_timings()
        return self.stats

    def _measure_lag(self, consumer: Consumer) -> None:
        """``destra_consumer_lag`` of each input topic: the high watermarks the consumer
        last heard of (cached: no broker request) minus its positions."""
        lag: dict[str, int] = dict.fromkeys(self.inputs, 0)
        for tp in consumer.position(self._assigned):
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and tp.offset >= 0:
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, high - tp.offset)
        for topic, behind in lag.items():
            CONSUMER_LAG.labels(self.group, topic).set(behind)

    def _write_timings(self) -> None:
        assert self.timings is not None
        path = os.path.join(self.timings, self.group.replace("/", "_") + ".json")
        with open(path, "w") as out:
            json.dump({"group": self.group, "phases": self.stats.phases,
                       "arrivals": self.stats.arrivals}, out)

    def _transaction(self, producer: EventProducer, consumer: Consumer, batch: list[Message],
                     tick: bool) -> None:
        poisoned: dict[tuple[str, int, int], BaseException] = {}
        while True:
            touched: set[int] = set()
            outcomes: list[tuple[Outcome, Message | None]] = []
            letters: list[Event] = []
            try:
                for msg in batch:
                    failed = poisoned.get(where(msg))
                    if failed is not None:
                        letters.append(self._failure_letter(msg, failed))
                        continue
                    outcomes += self._handle(msg, touched, letters)
                break
            except HandlerFailed as err:
                # A handler raised midway through one event, so its processor's state may
                # be half-changed: every processor goes back to its state after the last
                # committed batch and the batch runs again without that record, which is
                # dead-lettered with the error. Nothing was produced yet.
                poisoned[where(err.msg)] = err.error
                self._rewind()
        wall = now_ms()
        for msg in batch:  # a producer's clock ahead of ours must not move deadlines
            self._seen_ms = max(self._seen_ms, min(_timestamp(msg), wall))
        clock = self._clock(consumer) if tick else None
        if clock is not None:
            ctx = Context(clock, self.rng)
            for index, p in enumerate(self.processors):
                outcome = p.tick(ctx)
                if outcome:
                    touched.add(index)
                    outcomes.append((outcome, None))
        if not batch and not any(o.emit or o.rejected or o.work for o, _ in outcomes):
            return  # a quiet tick: nothing to commit (its state changes are re-derived)
        for tp in consumer.position(self._assigned):
            if tp.offset >= 0:
                self._positions[(tp.topic, tp.partition)] = tp.offset
        handled = time.perf_counter()
        # Everything slow is done before the transaction opens: its first record is
        # invisible to read_committed readers until it commits, so time spent inside it
        # is latency on every hop downstream.
        record = self._record(touched)
        journal = self._journal_record()
        checkpoint = None
        if self.checkpoint is not None and (
                time.monotonic() - self._checkpointed >= self.checkpoint_every_s):
            checkpoint = seal_snapshot(self.checkpoint(dict(self._positions)),
                                       self.snapshot_keys)
        recorded = time.perf_counter()
        producer.begin()
        try:
            for letter in letters:
                producer.send(letter)
                dead_lettered(_letter_code(letter))
            for outcome, source in outcomes:
                self._publish(producer, outcome, source)
            producer.send_raw(self.state_topic, self.group.encode(), record, partition=0)
            if journal is not None:
                producer.send_raw(self.journal_topic, self.group.encode(), journal,
                                  partition=self._journal_partition)
            self.stats.snapshots += 1
            if checkpoint is not None:
                producer.send_raw(self.state_topic, f"{self.group}/checkpoint".encode(),
                                  checkpoint, partition=0)
                self._checkpointed = time.monotonic()
            if self.stats.batches + 1 == self.crash_before_commit:
                producer.flush_pending()
                os.kill(os.getpid(), signal.SIGKILL)
            # The positions travel in the state record, in this transaction: no
            # AddOffsetsToTxn / TxnOffsetCommit round trips (about 12 ms a batch here).
            sent = time.perf_counter()
            producer.commit_positions(None)
        except BaseException:
            # This batch's decisions are not committed: the process must start again
            # from the last snapshot (its in-memory state is ahead of the log).
            try:
                producer.abort()
            except KafkaException:
                pass
            raise
        for log in self._logs().values():
            log.commit()
        self._batches.inc()
        self.stats.batches += 1
        self.stats.records += len(batch)
        if self.timings and len(self.stats.phases) < MAX_PHASES:  # a bench asked for them
            done = time.perf_counter()
            arrived = (max(0, self._fetched_ms - min(_timestamp(m) for m in batch))
                       if batch else 0)
            for m in batch:
                lag = self._fetched_ms - _timestamp(m)
                self.stats.arrivals.setdefault(m.topic() or "", []).append(
                    (self._fetched_ms, lag))
            self.stats.phases.append((
                self._fetched_ms, len(batch), len(record) + len(journal or b""),
                float(arrived), (handled - self._fetched) * 1000,
                (recorded - handled) * 1000, (sent - recorded) * 1000, (done - sent) * 1000))

    def _record(self, touched: set[int]) -> bytes:
        """The state record of this transaction: the input positions and each snapshotting
        processor's state (pickled again only if it handled something)."""
        for index in touched:
            p = self.processors[index]
            if p.recovery == Recovery.SNAPSHOT:
                self._pickled[p.name] = pickle.dumps(
                    p.snapshot(), protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[attr-defined]
        return seal_snapshot({"positions": self._positions, "states": dict(self._pickled),
                              "clock": self._seen_ms}, self.snapshot_keys)

    def _journal_record(self) -> bytes | None:
        """What this batch added to the expiring logs, sealed, or None if nothing."""
        added = {}
        for at, log in self._logs().items():
            entries = log.added()
            if entries:
                added[at] = entries
        if not added:
            return None
        return seal_snapshot({"logs": added}, self.snapshot_keys)

    def _clock(self, consumer: Consumer) -> int | None:
        """The time a tick may judge deadlines at: the wall clock once every assigned
        partition is read to its end, else the latest record time read (a worker catching
        up after a restart must not call a commit late that is waiting unread)."""
        for tp in consumer.position(self._assigned):
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0 or (tp.offset < high and not (tp.offset < 0 and high == low)):
                return self._seen_ms or None
        self._seen_ms = max(self._seen_ms, now_ms())
        return self._seen_ms

    def _handle(self, msg: Message, touched: set[int],
                letters: list[Event]) -> list[tuple[Outcome, Message | None]]:
        try:
            event = decode(msg.value() or b"")
        except Exception as err:  # EventError, or anything else a decoder let escape
            letters.append(dead_letter(msg, err, self.settings.producer_id or self.group))
            return []
        if self.shard is not None:
            task_id = event.fields.get("task_id")
            if isinstance(task_id, str) and not self.shard.owns(task_id):
                if msg.topic() in self._task_topics:
                    right = partition_for(task_id, TASK_PARTITIONS)
                    letters.append(dead_letter(msg, EventError(
                        f"misrouted: task {task_id} belongs on partition {right} of "
                        f"{msg.topic()}, not {msg.partition()}; nobody judges it here"),
                        self.settings.producer_id or self.group))
                return []  # another shard's task
        readers = [p for p in self._by_name.get(event.name, ())
                   if not hasattr(p, "wants") or p.wants(event)]
        if not readers:
            return []  # another type on a shared topic, or one no processor here acts on
        refusal = self.check(event) if self.check is not None else None
        if refusal is not None:
            return [(Outcome.refuse(event, refusal), msg)]
        ctx = Context(_timestamp(msg), self.rng, Origin(msg.topic() or "", msg.partition() or 0,
                                                        msg.offset() or 0, msg.key()),
                      wall_ms=now_ms())
        out: list[tuple[Outcome, Message | None]] = []
        for index, p in enumerate(self.processors):
            if p in readers:
                touched.add(index)
                started = time.perf_counter()
                try:
                    out.append((p.handle(event, ctx), msg))
                    self._metrics.handled(p.name, event.name, time.perf_counter() - started)
                except Exception as err:
                    if self._rewindable:
                        raise HandlerFailed(msg, err) from err
                    # A processor that cannot be rewound (the ledger decider, rebuilt by
                    # replay) validates before it changes anything, so a raise leaves its
                    # state as it was: the event is refused, the others stand.
                    log.warning("%s refused %s at %s/%s/%s: %s: %s", p.name, event.name,
                                msg.topic(), msg.partition(), msg.offset(),
                                type(err).__name__, err, extra=task_extra(event))
                    out.append((Outcome.refuse(event, _failure_reason(err)), msg))
        return out

    @property
    def _rewindable(self) -> bool:
        """Every processor here is snapshotted: the runner can put them back as they were
        after the last committed batch."""
        return bool(self.processors) and len(self._snapshotting) == len(self.processors)

    def _rewind(self) -> None:
        """Every snapshotting processor back to its state after the last committed batch."""
        for p in self._snapshotting:
            # Pickled by this process from the processor's own snapshot.
            p.restore(pickle.loads(self._pickled[p.name]))  # type: ignore[attr-defined]  # noqa: S301
        for log in self._logs().values():
            log.rollback()

    def _failure_letter(self, msg: Message, error: BaseException) -> Event:
        topic, partition, offset = where(msg)
        return letter(topic, partition, offset, msg.key(), msg.value() or b"",
                      _failure_reason(error), type(error).__name__,
                      self.settings.producer_id or self.group)

    def _publish(self, producer: EventProducer, outcome: Outcome, msg: Message | None) -> None:
        for e in outcome.emit:
            try:
                producer.send(self.sign(e))
            except RecordTooLarge as err:
                # Refused before it was sent: an output its topic cannot take must not
                # abort the batch (the restart would decide it again, and fail again).
                log.error("%s not emitted: %s", e.name, err)
                if msg is not None:
                    producer.send(self._failure_letter(msg, err))
                    dead_lettered("too-large")
                continue
            self._metrics.emitted(e.name)
            self.stats.emitted += 1
            shown = _TASK_LINES.get(e.name)
            if shown is not None and task_log.isEnabledFor(logging.INFO):
                task_log.info("%s %s", e.name, " ".join(
                    f"{k}={str(e.fields.get(k))[:200]}" for k in shown), extra=task_extra(e))
        for r in outcome.rejected:
            origin = r.origin
            producer.send(letter(
                origin.topic if origin else (msg.topic() or "(none)" if msg else "(none)"),
                origin.partition if origin else ((msg.partition() or 0) if msg else 0),
                origin.offset if origin else ((msg.offset() or 0) if msg else 0),
                origin.key if origin else (msg.key() if msg else None),
                r.event.raw or encode_unchecked(r.event),
                r.reason, "Rejected", self.settings.producer_id or self.group))
            dead_lettered(reason_code(r.reason))
            log.info("%s refused: %s", r.event.name, r.reason, extra=task_extra(r.event))
            self.stats.rejected += 1


class HandlerFailed(Exception):
    """A processor's handler raised on ``msg``: the batch is run again without it."""

    def __init__(self, msg: Message, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.msg = msg
        self.error = error


def _letter_code(letter: Event) -> str:
    """The ``destra_dead_letters_total`` code of a letter the runner made itself: a record
    that did not decode, one on another shard's partition, or one a handler raised on."""
    reason = str(letter.fields.get("reason", ""))
    if reason.startswith("handler-error"):
        return "handler-error"
    if reason.startswith("misrouted"):
        return "misrouted"
    return "undecodable"


def _failure_reason(error: BaseException) -> str:
    return f"handler-error: {type(error).__name__}: {error}"


def _records(consumer: Consumer, tp: TopicPartition, start: int, end: int) -> Iterator[Message]:
    """The records of ``tp`` from ``start`` to ``end``, in order (read_committed: an aborted
    batch's are not there)."""
    if start >= end:
        return
    consumer.assign([TopicPartition(tp.topic, tp.partition, start)])
    while True:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None and (msg.offset() or 0) < end:
            yield msg
        # Checked at every record too, not only on a quiet poll: other services write these
        # topics many times a second, so a read that waited for a quiet poll would never end
        # (the chaos test saw restarts stall for as long as the network was busy).
        (position,) = consumer.position([tp])
        if position.offset >= end:
            return


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout_s: float = 60.0) -> tuple[int, int]:
    """A partition's offsets, waiting out a leader not elected yet (a topic just made)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            return int(low), int(high)
        except KafkaException as err:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for %s/%d: %s", tp.topic, tp.partition, err)
            time.sleep(0.2)


def _committed(consumer: Consumer, partitions: list[TopicPartition],
               timeout_s: float = 60.0) -> list[TopicPartition]:
    """The group's committed offsets, waiting out a coordinator still loading."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return list(consumer.committed(partitions, timeout=10))
        except KafkaException as err:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for the group coordinator: %s", err)
            time.sleep(0.2)


def _topic_metadata(consumer: Consumer, topic: str, timeout_s: float = 60.0,
                    what: str = "input topic") -> Any:
    """A topic's metadata, waiting for it to exist with leaders (a network just made)."""
    deadline = time.monotonic() + timeout_s
    while True:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions and all(
                p.leader >= 0 for p in meta.partitions.values()):
            return meta
        if time.monotonic() > deadline:
            raise StateError(f"{what} {topic} does not exist (run `destra infra up`, which "
                             "makes every topic of this version)")
        time.sleep(0.2)


def _timestamp(msg: Message) -> int:
    kind, ts = msg.timestamp()
    return int(ts) if kind and ts > 0 else now_ms()
