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
* writes a signed snapshot of each ``Recovery.SNAPSHOT`` processor that
  handled anything to the compacted ``processors.state`` topic;
* commits the consumer's positions.

A crash before the commit shows none of it to ``read_committed`` readers and
the inputs are read again; a crash after it never re-reads them. A restart
restores the latest snapshot of each processor, which is exactly the state
after the last committed batch, and resumes from that batch's positions: the
cost of a restart is one snapshot, not the length of history.

Nothing waits on a timer between a record's arrival and its handler: the
consumer returns as soon as one record is there (``streams.consumer.fetch``)
and a batch is whatever has arrived meanwhile.
"""

from __future__ import annotations

import logging
import os
import pickle  # noqa: S403 - only ever loads snapshots this service signed (checked first)
import random
import signal
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from destra.settings import Settings
from schemas import Event, decode, new_event
from schemas.codec import encode_unchecked
from schemas.errors import EventError, StateError
from schemas.events import now_ms
from schemas.signatures import KeyPair, verify
from streams.consumer import consumer_config, dead_letter, fetch
from streams.klog import KAFKA_LOG
from streams.processing import Context, Origin, Outcome, Processor, Recovery
from streams.producer import EventProducer
from streams.topics import DEAD_LETTER, STATE, topic_for

log = logging.getLogger(__name__)

SNAPSHOT_MAGIC = b"DSNP1"
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024


def seal_snapshot(state: Any, keys: KeyPair) -> bytes:
    """``DSNP1``, the service's Ed25519 signature, then the compressed pickled state."""
    body = zlib.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), 1)
    return SNAPSHOT_MAGIC + keys.sign(body) + body


def open_snapshot(data: bytes, public_key: bytes) -> Any:
    """The state in a sealed snapshot; ``StateError`` unless the service key signed it."""
    head = len(SNAPSHOT_MAGIC)
    if not data.startswith(SNAPSHOT_MAGIC) or len(data) < head + 64:
        raise StateError("not a Destra state snapshot")
    signature, body = data[head:head + 64], data[head + 64:]
    if not verify(public_key, body, signature):
        raise StateError("state snapshot not signed by this service's key: refused")
    return pickle.loads(zlib.decompress(body))  # noqa: S301 - signed by us, checked above


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
    instance: str = "0"
    """This instance's name in the group (static membership)."""
    producer_overrides: Mapping[str, Any] = field(default_factory=dict)
    """librdkafka settings for the transactional producer, over the runner's own."""
    crash_before_commit: int = 0
    """Failpoint for crash tests: SIGKILL this process in its n-th batch, the batch's
    events delivered and its transaction open, the worst moment to lose it."""
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
        self._seen_ms = 0
        """The latest record time read, or tick time: the clock never goes back."""

    # -- restart ----------------------------------------------------------------------------

    def restore(self) -> None:
        """Restore each snapshotting processor from its latest committed snapshot."""
        started = time.perf_counter()
        wanted = {self._state_key(p) for p in self._snapshotting}
        latest = self._latest_snapshots(wanted) if wanted else {}
        for p in self._snapshotting:
            data = latest.get(self._state_key(p))
            if data is None:
                continue  # a first start
            p.restore(open_snapshot(data, self.snapshot_keys.signing_public))  # type: ignore[attr-defined]
            self.stats.restored[p.name] = len(data)
        self.stats.restore_ms = (time.perf_counter() - started) * 1000

    def _state_key(self, p: Processor) -> str:
        return f"{self.group}/{p.name}"

    def _latest_snapshots(self, wanted: set[str]) -> dict[str, bytes]:
        """The last committed record of each wanted key, reading back from the topic's end."""
        consumer = Consumer(consumer_config(self.bootstrap, f"{self.group}-restore",
                                            {"enable.auto.commit": False}))
        try:
            tp = TopicPartition(self.state_topic, 0)
            low, high = _watermarks(consumer, tp)
            back = 16
            while True:
                start = max(low, high - back)
                found = self._read_range(consumer, tp, start, high)
                if wanted <= set(found) or start == low:
                    return found
                back *= 4
        finally:
            consumer.close()

    @staticmethod
    def _read_range(consumer: Consumer, tp: TopicPartition, start: int,
                    end: int) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        if start >= end:
            return found
        consumer.assign([TopicPartition(tp.topic, tp.partition, start)])
        while True:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None and msg.key() is not None:
                found[msg.key().decode()] = msg.value() or b""
                continue
            (position,) = consumer.position([tp])
            if position.offset >= end:
                return found

    # -- the loop ---------------------------------------------------------------------------

    def run(self, running: Callable[[], bool] = lambda: True,
            idle_exit_s: float | None = None) -> RunStats:
        """Process until ``running()`` is false, or nothing arrives for ``idle_exit_s``."""
        self.restore()
        producer = EventProducer(self.settings, self.bootstrap, {
            "transactional.id": self.group,
            "transaction.timeout.ms": 60_000,
            "message.timeout.ms": 55_000,  # librdkafka: not above the transaction timeout
            "message.max.bytes": MAX_SNAPSHOT_BYTES + 1024 * 1024,
            "linger.ms": 0,
            **self.producer_overrides,
        })
        producer.init_transactions()
        consumer = Consumer(consumer_config(self.bootstrap, self.group, {
            "enable.auto.commit": False, "logger": KAFKA_LOG,
            "fetch.wait.max.ms": 10, "fetch.queue.backoff.ms": 0,
            # Static membership: a restarted instance takes its partitions back at once,
            # instead of waiting out its killed predecessor's session.
            "group.instance.id": f"{self.group}-{self.instance}",
            "session.timeout.ms": 10_000,
        }))
        consumer.subscribe(self.inputs)
        last_tick, last_record = 0.0, time.monotonic()
        try:
            while running():
                batch = [m for m in fetch(consumer, self.batch, self.poll_s)
                         if m.error() is None]
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
        finally:
            consumer.close()
        return self.stats

    def _transaction(self, producer: EventProducer, consumer: Consumer, batch: list[Message],
                     tick: bool) -> None:
        touched: set[int] = set()
        outcomes: list[tuple[Outcome, Message | None]] = []
        letters: list[Event] = []
        for msg in batch:
            outcomes += self._handle(msg, touched, letters)
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
        producer.begin()
        try:
            for letter in letters:
                producer.send(letter)
            for outcome, msg in outcomes:
                self._publish(producer, outcome, msg)
            for index in sorted(touched):
                p = self.processors[index]
                if p.recovery == Recovery.SNAPSHOT:
                    producer.send_raw(self.state_topic, self._state_key(p).encode(),
                                      seal_snapshot(p.snapshot(),  # type: ignore[attr-defined]
                                                    self.snapshot_keys), partition=0)
                    self.stats.snapshots += 1
            if self.stats.batches + 1 == self.crash_before_commit:
                producer.flush_pending()
                os.kill(os.getpid(), signal.SIGKILL)
            producer.commit_positions(consumer)
        except BaseException:
            # This batch's decisions are not committed: the process must start again
            # from the last snapshot (its in-memory state is ahead of the log).
            try:
                producer.abort()
            except KafkaException:
                pass
            raise
        self.stats.batches += 1
        self.stats.records += len(batch)

    def _clock(self, consumer: Consumer) -> int | None:
        """The time a tick may judge deadlines at: the wall clock once every assigned
        partition is read to its end, else the latest record time read (a worker catching
        up after a restart must not call a commit late that is waiting unread); None
        while no partition is assigned."""
        assignment = consumer.assignment()
        if not assignment:
            return None
        for tp in consumer.position(assignment):
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0 or (tp.offset < high and not (tp.offset < 0 and high == low)):
                return self._seen_ms or None
        self._seen_ms = max(self._seen_ms, now_ms())
        return self._seen_ms

    def _handle(self, msg: Message, touched: set[int],
                letters: list[Event]) -> list[tuple[Outcome, Message | None]]:
        try:
            event = decode(msg.value() or b"")
        except EventError as err:
            letters.append(dead_letter(msg, err, self.settings.producer_id or self.group))
            return []
        refusal = self.check(event) if self.check is not None else None
        if refusal is not None:
            return [(Outcome.refuse(event, refusal), msg)]
        ctx = Context(_timestamp(msg), self.rng, Origin(msg.topic() or "", msg.partition() or 0,
                                                        msg.offset() or 0, msg.key()))
        out = []
        for index, p in enumerate(self.processors):
            if p in self._by_name.get(event.name, ()):
                touched.add(index)
                out.append((p.handle(event, ctx), msg))
        return out

    def _publish(self, producer: EventProducer, outcome: Outcome, msg: Message | None) -> None:
        for e in outcome.emit:
            producer.send(self.sign(e))
            self.stats.emitted += 1
        for r in outcome.rejected:
            origin = r.origin
            letter = new_event(
                "DeadLettered", self.settings.producer_id or self.group,
                source_topic=origin.topic if origin else (msg.topic() if msg else "(none)"),
                source_partition=origin.partition if origin else (msg.partition() if msg else 0),
                source_offset=origin.offset if origin else (msg.offset() if msg else 0),
                key=origin.key if origin else (msg.key() if msg else None),
                value=r.event.raw if getattr(r.event, "raw", None) else encode_unchecked(r.event),
                reason=r.reason[:2000], error="Rejected")
            producer.send(letter)
            self.stats.rejected += 1


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


def _timestamp(msg: Message) -> int:
    kind, ts = msg.timestamp()
    return int(ts) if kind and ts > 0 else now_ms()
