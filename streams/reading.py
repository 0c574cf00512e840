"""Reading a whole topic at once: its high watermarks now, and every committed record up to them.

For rebuilds and checks (the ledger processor's state, the demo's and the
client's look-ups, the tests), not for live processing: live readers use
``streams.consumer.EventConsumer`` in a consumer group.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from streams.consumer import consumer_config
from streams.klog import KAFKA_LOG
from streams.security import client_config


def end_offsets(bootstrap: str, topic: str) -> dict[tuple[str, int], int]:
    """The high watermark of every non-empty partition of a topic, now."""
    consumer = Consumer({**client_config(bootstrap), "group.id": f"wm-{uuid.uuid4()}",
                         "logger": KAFKA_LOG})
    try:
        return _ends(consumer, topic)
    finally:
        consumer.close()


def _ends(consumer: Consumer, topic: str) -> dict[tuple[str, int], int]:
    metadata = consumer.list_topics(topic, timeout=10)
    ends = {}
    for p in metadata.topics[topic].partitions:
        high = _high_watermark(consumer, TopicPartition(topic, p))
        if high > 0:
            ends[(topic, p)] = high
    return ends


_SETTLING = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
             KafkaError.UNKNOWN_TOPIC_OR_PART}


def _high_watermark(consumer: Consumer, tp: TopicPartition, timeout_s: float = 30.0) -> int:
    # A just-created topic answers "not leader" until its leaders are elected.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            return int(high)
        except KafkaException as e:
            settling = e.args[0].code() in _SETTLING or e.args[0].retriable()
            if not settling or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_all(bootstrap: str, topic: str,
             start: Mapping[tuple[str, int], int] | None = None) -> list[Any]:
    """Every committed record (a ``confluent_kafka.Message``) of a topic, from offset 0 (or
    ``start``'s offset of each partition it names) to its end now."""
    start = start or {}
    consumer = Consumer(consumer_config(bootstrap, f"rebuild-{uuid.uuid4()}", {
        "enable.auto.commit": False,
        # librdkafka says at once when a partition's end is reached, past its transaction
        # markers, rather than a poll timing out first; and a fetch at the end does not
        # wait 500 ms for more.
        "enable.partition.eof": True, "fetch.wait.max.ms": 10}))
    try:
        # The same consumer learns the partitions' leaders here: assigned before it knows
        # them, librdkafka retries the first offset look-up only after 500 ms.
        # Only partitions with something to read: a consumer's position in one it reads
        # nothing from stays unset, and the end would never be seen reached.
        ends = {tp: end for tp, end in _ends(consumer, topic).items()
                if start.get(tp, 0) < end}
        if not ends:
            return []
        # Assigned, not subscribed: no group to join, so a rebuild starts at once.
        assignment = [TopicPartition(t, p, start.get((t, p), OFFSET_BEGINNING))
                      for t, p in ends]
        consumer.assign(assignment)
        records = []
        pending = set(ends)
        while pending:
            msg = consumer.poll(0.5)
            if msg is None:
                # Positions, not record offsets: transaction markers take offsets too, so
                # the last record may sit below the high watermark.
                pending -= {(tp.topic, tp.partition) for tp in consumer.position(assignment)
                            if tp.offset >= ends[(tp.topic, tp.partition)]}
                continue
            where = (msg.topic() or "", msg.partition() or 0)
            offset = msg.offset()
            error = msg.error()
            if error is not None:
                # The end of what is committed, done once at or past "now"'s end: an open
                # transaction below it is waited for, as its records may yet commit.
                if error.code() == KafkaError._PARTITION_EOF and (offset or 0) >= ends[where]:
                    pending.discard(where)
                continue
            if offset is None:
                continue
            if offset < ends[where]:  # later ones are past "now"
                records.append(msg)
            if offset >= ends[where] - 1:
                pending.discard(where)
        return records
    finally:
        consumer.close()
