"""Consumer helpers: decoded events out, bad records to the dead-letter topic.

A record that fails to decode or validate, or an authority event that is not
signed by a service role the genesis allows (``streams.authority``), is written
to the dead-letter topic with the reason and its original bytes, acknowledged
there, and only then is its offset stored, so nothing is lost and the consumer
goes on; the caller never sees it.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from destra.errors import DestraError, EventError
from destra.settings import Settings
from schemas import Event, decode, new_event
from schemas.codec import encode_unchecked
from schemas.errors import UnauthenticatedEvent
from streams.authority import AUTHORITY, Genesis
from streams.klog import KAFKA_LOG
from streams.producer import EventProducer
from streams.security import client_config
from streams.topics import DEAD_LETTER


@dataclass(frozen=True)
class Delivery:
    """One decoded event and where it came from."""

    event: Event
    topic: str
    partition: int
    offset: int
    key: bytes | None


def consumer_config(
    bootstrap: str, group_id: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """At-least-once: offsets are stored only after the caller has handled the event."""
    config: dict[str, Any] = {
        **client_config(bootstrap),
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
        # librdkafka waits this long before fetching a partition again once its local
        # queue is over queued.min.messages / queued.max.messages.kbytes (default 1 s).
        "fetch.queue.backoff.ms": 10,
        # fetch.wait.max.ms stays 500: the broker answers a waiting fetch as soon as a
        # record is appended (measured 3 ms append -> poll), so it only bounds idle polls.
        "logger": KAFKA_LOG,
    }
    config.update(overrides or {})
    return config


class EventConsumer:
    """Polls topics, yields decoded, authenticated events, dead-letters the rest.

    ``genesis`` defaults to the file ``settings.genesis_path``, read when the first
    authority event arrives (a consumer of outside parties' events needs none).
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        group_id: str,
        topics: Sequence[str],
        overrides: Mapping[str, Any] | None = None,
        dead_letters: EventProducer | None = None,
        start_at: Callable[[str, int], int | None] | None = None,
        genesis: Genesis | None = None,
    ) -> None:
        self.settings = settings
        self._genesis = genesis
        self._consumer = Consumer(consumer_config(bootstrap, group_id, overrides))
        self._assigned_at: dict[tuple[str, int], int] = {}
        if start_at is None:
            self._consumer.subscribe(list(topics))
        else:
            # A projection keeps its positions with its data: it takes every
            # partition itself, at those positions, with no group to rebalance
            # (a killed predecessor would otherwise hold its partitions until its
            # session times out).
            assignment = self._positions(list(topics), start_at)
            self._assigned_at = {(tp.topic, tp.partition): max(tp.offset, 0)
                                 for tp in assignment}
            self._consumer.assign(assignment)
        self._dead_letters = dead_letters or EventProducer(settings, bootstrap)
        self._owns_dlq = dead_letters is None
        self.dead_lettered = 0
        self.passed: dict[tuple[str, int], int] = {}
        """Per partition, the offset after the last record dead-lettered here: a caller
        that keeps its positions itself stores these too (``take_passed``), so a restart
        does not read those records again."""
        self.batch_size = 500
        self._buffer: deque[Message] = deque()

    def _positions(self, topics: list[str],
                   start_at: Callable[[str, int], int | None]) -> list[TopicPartition]:
        metadata = self._consumer.list_topics(timeout=30)
        partitions = []
        for topic in topics:
            if topic not in metadata.topics:
                raise EventError(f"topic {topic} does not exist")
            for p in sorted(metadata.topics[topic].partitions):
                offset = start_at(topic, p)
                partitions.append(
                    TopicPartition(topic, p, OFFSET_BEGINNING if offset is None else offset))
        return partitions

    def poll(self, timeout_s: float = 1.0) -> Delivery | None:
        """The next good event, or None when none arrived within the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._buffer:
                left = max(0.0, deadline - time.monotonic())
                # Fetch in batches: one call into librdkafka per batch, not per event.
                self._buffer.extend(fetch(self._consumer, self.batch_size, left))
                if not self._buffer:
                    return None
            msg = self._buffer.popleft()
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if time.monotonic() >= deadline:
                    return None
                continue  # transient (a broker restarting): librdkafka retries by itself
            delivery = self._decode(msg)
            if delivery is not None:
                return delivery
            if time.monotonic() >= deadline:
                return None

    def stream(self, idle_timeout_s: float = 5.0) -> Iterator[Delivery]:
        """Yield events (storing each offset after the caller's loop body) until idle."""
        while True:
            delivery = self.poll(idle_timeout_s)
            if delivery is None:
                return
            yield delivery
            self.store(delivery)

    def caught_up(self, ends: Mapping[tuple[str, int], int]) -> bool:
        """True once every partition in ``ends`` has been read up to its end offset.

        Compares the consumer's positions, not record offsets: transaction markers
        take offsets too, so a topic's last record may sit below its end.
        """
        if self._buffer:
            return False
        assigned = self._consumer.position(self._consumer.assignment())
        # Before a partition's first record, librdkafka reports no position (< 0):
        # it is then still where it was assigned.
        positions = {(tp.topic, tp.partition): tp.offset if tp.offset >= 0
                     else self._assigned_at.get((tp.topic, tp.partition), -1)
                     for tp in assigned}
        return all(positions.get(key, -1) >= end for key, end in ends.items())

    def store(self, delivery: Delivery) -> None:
        """Mark an event handled; its offset is committed with the next auto-commit."""
        self._consumer.store_offsets(
            offsets=[_next_offset(delivery.topic, delivery.partition, delivery.offset)]
        )

    def commit(self) -> None:
        """Commit stored offsets now, synchronously."""
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:
                raise

    def _decode(self, msg: Message) -> Delivery | None:
        value = msg.value() or b""
        topic, partition, offset = where(msg)
        try:
            event = decode(value)
        except EventError as e:
            self._dead_letter(msg, value, e)
            return None
        if event.name in AUTHORITY:
            if self._genesis is None:
                self._genesis = Genesis.load(self.settings.genesis_path)
            refusal = self._genesis.check(event)
            if refusal is not None:
                self._dead_letter(msg, value, UnauthenticatedEvent(refusal))
                return None
        return Delivery(event, topic, partition, offset, msg.key())

    def _dead_letter(self, msg: Message, value: bytes, error: DestraError) -> None:
        self._dead_letters.send(dead_letter(msg, error, self.settings.producer_id))
        # Durable on the dead-letter topic before the bad record's offset moves on.
        self._dead_letters.flush()
        topic, partition, offset = where(msg)
        self._consumer.store_offsets(offsets=[_next_offset(topic, partition, offset)])
        self.passed[(topic, partition)] = offset + 1
        self.dead_lettered += 1

    def take_passed(self) -> dict[tuple[str, int], int]:
        """The positions past the records dead-lettered since the last call (``passed``)."""
        passed, self.passed = self.passed, {}
        return passed

    def refuse(self, delivery: Delivery, error: Exception) -> None:
        """Dead-letter an event its caller could not handle (a value Postgres refuses), with
        the reason, durably, before the caller moves past it."""
        event = delivery.event
        self._dead_letters.send(letter(
            delivery.topic, delivery.partition, delivery.offset, delivery.key,
            event.raw or encode_unchecked(event), f"{type(error).__name__}: {error}",
            type(error).__name__, self.settings.producer_id))
        self._dead_letters.flush()
        self.dead_lettered += 1

    def close(self) -> None:
        """Commit what was handled and leave the group."""
        try:
            self.commit()
        finally:
            self._consumer.close()
            if self._owns_dlq:
                self._dead_letters.close()

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Up to ``max_messages`` records, returning as soon as one is there.

    librdkafka's ``consume(n, timeout)`` waits until ``n`` records arrived or the
    whole timeout passed (measured: one record, ``consume(100, 3.0)``, 3.0 s), so
    on a quiet topic every hop would cost the full timeout. Here the wait is for
    the first record only; the rest of the batch is what is already fetched.
    """
    first = consumer.consume(1, timeout_s)
    if not first or max_messages <= 1:
        return list(first)
    return first + consumer.consume(max_messages - 1, 0)


DEAD_LETTER_COPY_MAX_BYTES = 512 * 1024
"""A record whose key and value together exceed this is referenced in its dead letter, not
copied: the dead-letter topic takes records up to the broker's default 1 MiB, and a record
the broker accepted on another topic (compressed, or on a topic with a higher limit) can
be larger. The reference is where it is (topic, partition, offset), its size and the
SHA-256 of its value."""


def dead_letter(msg: Message, error: Exception, producer_id: str) -> Event:
    """The DeadLettered event for a record: where it was, why, and its original bytes (or a
    reference to them when they are too large to copy)."""
    topic, partition, offset = where(msg)
    return letter(topic, partition, offset, msg.key(), msg.value() or b"",
                  str(error), type(error).__name__, producer_id)


def letter(topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
           reason: str, error: str, producer_id: str) -> Event:
    """The DeadLettered event for the record at ``topic``/``partition``/``offset``: its key
    and value copied when they fit (``DEAD_LETTER_COPY_MAX_BYTES``), else a reference."""
    size = len(value) + len(key or b"")
    if size <= DEAD_LETTER_COPY_MAX_BYTES:
        return new_event(
            "DeadLettered", producer_id,
            source_topic=topic, source_partition=partition, source_offset=offset,
            key=key, value=value, reason=reason[:2000], error=error[:128] or "Error")
    return new_event(
        "DeadLettered", producer_id,
        source_topic=topic, source_partition=partition, source_offset=offset,
        key=None, value=b"", reason=reason[:2000], error=error[:128] or "Error",
        original_size=size, original_sha256=hashlib.sha256(value).hexdigest())


def refuse(genesis: Genesis, msg: Message, event: Event, producer_id: str) -> Event | None:
    """The DeadLettered event refusing ``event`` (read from ``msg``) when it is an authority
    event without a valid service signature; None when it may be acted on."""
    refusal = genesis.check(event)
    if refusal is None:
        return None
    return dead_letter(msg, UnauthenticatedEvent(refusal), producer_id)


def where(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a fetched record (always set on one without error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise EventError(f"record without a position: {topic}/{partition}/{offset}")
    return topic, partition, offset


def _next_offset(topic: str, partition: int, offset: int) -> TopicPartition:
    return TopicPartition(topic, partition, offset + 1)


def dead_letter_topic(settings: Settings) -> str:
    """The full name of the dead-letter topic."""
    return DEAD_LETTER.name(settings.topic_prefix)
