"""A thin typed producer over confluent-kafka: idempotent, ``acks=all``, Avro events.

Each event goes to the topic the catalogue names for its type, keyed by the
field the topic is keyed by, so every event about one key stays in order. A
producer given a service ``signer`` signs every authority event it sends
(``streams.authority``) with that role's key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from destra.errors import ConfigError, DeliveryFailed, InvalidEvent
from destra.settings import Settings
from schemas import Event, encode
from streams.authority import AUTHORITY, ServiceSigner
from streams.klog import KAFKA_LOG
from streams.security import client_config
from streams.topics import RECORD_OVERHEAD_BYTES, inbox_topic, node_view, topic_for

log = logging.getLogger(__name__)

INBOX_RECHECK_S = 5.0
"""How long a node's inbox found missing is taken as missing before it is looked up again."""


class RecordTooLarge(InvalidEvent):
    """An event whose encoding exceeds its topic's record size limit: refused before it
    is sent, where the broker would refuse it (or a consumer could not dead-letter it)."""


DeliveryCallback = Callable[[KafkaError | None, Message], None]


class Inboxes:
    """Which nodes' inbox topics exist, as far as this producer knows.

    ``lookup(topic)`` asks the broker: True (it exists), False (the broker says there is
    no such topic), or it raises (no answer: the caller's send fails, rather than a node
    missing a record it was owed). An inbox once found is never looked up again; a missing
    one is looked up again at most every ``recheck_s``.
    """

    def __init__(self, lookup: Callable[[str], bool], recheck_s: float = INBOX_RECHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self.recheck_s = recheck_s
        self._clock = clock
        self._known: set[str] = set()
        self._missing: dict[str, float] = {}
        """Inbox topic -> when it was last found missing."""

    def exists(self, topic: str) -> bool:
        """Whether ``topic`` exists (cached; see the class)."""
        if topic in self._known:
            return True
        now = self._clock()
        missed = self._missing.get(topic)
        if missed is not None and now - missed < self.recheck_s:
            return False
        if self._lookup(topic):
            self._known.add(topic)
            if self._missing.pop(topic, None) is not None:
                log.warning("inbox %s exists now: its node's records go there too", topic)
            return True
        if missed is None:
            log.warning("no inbox topic %s: its node's records go to the assignments topic "
                        "only (a node joined by an older version, or by hand: `destra node "
                        "join` makes its inbox)", topic)
        self._missing[topic] = now
        return False


def producer_config(bootstrap: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one producer configuration: no acknowledged write is ever lost or duplicated."""
    config: dict[str, Any] = {
        **client_config(bootstrap),
        "enable.idempotence": True,  # implies acks=all and bounded in-flight requests
        "acks": "all",
        # No batching timer: a record is sent as soon as the broker connection is free;
        # what queues meanwhile (up to 5 requests in flight) still goes out as one batch.
        # 5 ms here was 5 ms on every hop a librdkafka client produces (submissions,
        # grants, commits, reveals, ledger entries).
        "linger.ms": 0,
        # First retry after 10 ms (doubling up to retry.backoff.max.ms, 1 s), not 100 ms:
        # a transactional producer's AddOffsetsToTxn answered CONCURRENT_TRANSACTIONS
        # (the previous transaction's markers still being written) waits this long.
        "retry.backoff.ms": 10,
        "compression.type": "lz4",
        "message.timeout.ms": 120_000,
        "logger": KAFKA_LOG,
    }
    config.update(overrides or {})
    return config


class EventProducer:
    """Encodes events and produces them; ``flush`` raises if any delivery failed."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        overrides: Mapping[str, Any] | None = None,
        signer: ServiceSigner | None = None,
        inboxes: Inboxes | None = None,
        sign_view: Callable[[Event], Event] | None = None,
    ) -> None:
        self.settings = settings
        self.signer = signer
        """The service role whose key signs the authority events sent (None: none signed)."""
        self.sign_view = sign_view or (signer.sign if signer is not None else None)
        """Signs a node's view of an event (``node_view``) for its inbox: the sender's key
        (a runner that signs its outputs itself passes its signing function)."""
        self._config = producer_config(bootstrap, overrides)
        self._producer: Producer | None = None
        self._failures: list[str] = []
        self.delivered = 0
        self.inboxes = inboxes or Inboxes(self._inbox_exists)
        """Which nodes' inboxes exist: a record of an ``inbox`` topic goes to its node's too."""

    @property
    def _kafka(self) -> Producer:
        # Created on first use: constructing the wrapper must not touch the network.
        if self._producer is None:
            self._producer = Producer(self._config)
        return self._producer

    def topic_name(self, event: Event) -> str:
        """The full topic name an event is written to."""
        return topic_for(event.name).name(self.settings.topic_prefix)

    def key_of(self, event: Event) -> bytes:
        """The record key: the event's value of its topic's key field."""
        spec = topic_for(event.name)
        return str(event.fields[spec.key]).encode()

    def send(self, event: Event, on_delivery: DeliveryCallback | None = None) -> Event:
        """Sign (an authority event, with a signer), encode (validating) and enqueue one
        event; raises InvalidEvent before sending. Returns the event as sent."""
        if self.signer is not None and event.name in AUTHORITY:
            event = self.signer.sign(event)
        key = self.key_of(event)
        value = encode(event)
        spec = topic_for(event.name)
        size = len(key) + len(value) + RECORD_OVERHEAD_BYTES
        if size > spec.max_record_bytes:
            raise RecordTooLarge(
                f"{event.name} {event.event_id}: {len(value)} bytes encoded (key {len(key)}) "
                f"exceeds the {spec.max_record_bytes}-byte record limit of topic "
                f"{spec.suffix}; large payloads go to the blob store")
        home = self.topic_name(event)
        for topic, partition in self.destinations(event):
            copy = value
            if topic != home:  # its node's inbox: what the node may not read left out
                view = node_view(event)
                if view is not event:
                    if self.sign_view is None and event.signature is not None:
                        raise ConfigError(f"{event.name} is signed, and this producer cannot "
                                          "sign its node's view of it (sign_view)")
                    copy = encode(self.sign_view(view) if self.sign_view is not None
                                  else view)
            self.send_raw(topic, key, copy, on_delivery if topic == home else None,
                          partition)
        return event

    def destinations(self, event: Event) -> list[tuple[str, int | None]]:
        """The topics (and partitions) an event is written to: its catalogue topic, and
        for a record of an ``inbox`` topic first its node's inbox, when that exists."""
        spec = topic_for(event.name)
        key = str(event.fields[spec.key])
        home = (spec.name(self.settings.topic_prefix), spec.partition_of(key))
        if not spec.inbox:
            return [home]
        inbox = inbox_topic(self.settings.topic_prefix, key)
        if inbox is None or not self.inboxes.exists(inbox):
            return [home]
        # The inbox first: a crash between the two (outside a transaction) leaves the node
        # able to act and the record's sender unanswered, so it sends it again.
        return [(inbox, 0), home]

    def _inbox_exists(self, topic: str) -> bool:
        """Ask the broker whether ``topic`` exists (a metadata request for it alone)."""
        try:
            metadata = self._kafka.list_topics(topic=topic, timeout=10)
        except KafkaException as e:
            raise DeliveryFailed(f"could not look up inbox topic {topic}: {e}") from e
        found = metadata.topics.get(topic)
        if found is None:
            return False
        if found.error is None:
            return bool(found.partitions)
        if found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return False
        if found.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            log.warning("this principal may not describe inbox topic %s (ACLs issued by an "
                        "older version: issue them again)", topic)
            return False
        raise DeliveryFailed(f"could not look up inbox topic {topic}: {found.error.str()}")

    def send_raw(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        on_delivery: DeliveryCallback | None = None,
        partition: int | None = None,
    ) -> None:
        """Enqueue bytes as they are (dead letters, tests of corrupt input); ``partition``
        None lets the client's partitioner choose."""

        def done(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                self.delivered += 1
            else:
                self._failures.append(f"{msg.topic()}: {err.str()}")
            if on_delivery is not None:
                on_delivery(err, msg)

        while True:
            try:
                if partition is None:
                    self._kafka.produce(topic, value=value, key=key, on_delivery=done)
                else:
                    self._kafka.produce(topic, value=value, key=key, on_delivery=done,
                                        partition=partition)
                break
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self._kafka.poll(0.05)
        self._kafka.poll(0)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait for every enqueued event's acknowledgement."""
        if self._producer is None:
            return
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise DeliveryFailed(f"{remaining} events not acknowledged within {timeout_s}s")
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryFailed(f"{len(failures)} events failed; first: {failures[0]}")

    def init_transactions(self, timeout_s: float = 60.0) -> None:
        """Register the ``transactional.id`` (fencing any older instance using it)."""
        self._kafka.init_transactions(timeout_s)

    def begin(self) -> None:
        """Start a Kafka transaction: what is sent until ``commit`` appears atomically."""
        self._kafka.begin_transaction()

    def commit(self, consumer: Any, timeout_s: float = 60.0) -> None:
        """Commit the transaction together with the consumer's positions (exactly-once)."""
        positions = consumer.position(consumer.assignment())
        self._kafka.send_offsets_to_transaction(
            positions, consumer.consumer_group_metadata(), timeout_s)
        self._kafka.commit_transaction(timeout_s)

    def commit_positions(self, consumer: Any, timeout_s: float = 60.0) -> None:
        """Commit the transaction with the consumer's valid positions (there may be none
        yet right after a subscription: then the transaction commits alone; with no
        consumer, the caller keeps its positions in the transaction itself)."""
        positions = [] if consumer is None else [
            tp for tp in consumer.position(consumer.assignment()) if tp.offset >= 0]
        if positions:
            self._kafka.send_offsets_to_transaction(
                positions, consumer.consumer_group_metadata(), timeout_s)
        self._kafka.commit_transaction(timeout_s)

    def flush_pending(self, timeout_s: float = 30.0) -> None:
        """Deliver what is queued, inside an open transaction, without committing it."""
        self._kafka.flush(timeout_s)

    def abort(self, timeout_s: float = 60.0) -> None:
        """Abort the transaction: nothing sent since ``begin`` becomes visible."""
        self._kafka.abort_transaction(timeout_s)

    def close(self) -> None:
        """Flush and drop the client."""
        self.flush()
        self._producer = None

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
