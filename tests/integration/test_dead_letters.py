"""Records that cannot be decoded or validated go to the dead-letter topic; nothing stops."""

from __future__ import annotations

import uuid

import pytest

from destra.errors import EventError
from destra.settings import Settings
from schemas import decode, encode
from schemas.samples import encode_unchecked, sample_event, with_fields
from streams.consumer import EventConsumer, dead_letter_topic
from streams.producer import EventProducer

pytestmark = pytest.mark.integration


def test_bad_records_are_dead_lettered_and_the_consumer_goes_on(
    network: Settings, kafka: str
) -> None:
    producer = EventProducer(network, kafka)
    good = [sample_event("NodeHeartbeat") for _ in range(3)]
    topic = producer.topic_name(good[0])
    valid = encode(good[1])
    corrupt = b"\xc3\x01" + valid[2:10] + b"\xff" * 5  # right header, truncated garbage body
    unknown = b"\xc3\x01" + bytes(8) + valid[10:]  # a fingerprint nobody registered
    out_of_range = encode_unchecked(with_fields(good[2], load_permille=5000))

    # good, corrupt, good, unknown fingerprint, out of range, good: all on one partition.
    key = b"node-dlq"
    for value in (encode(good[0]), corrupt, valid, unknown, out_of_range, encode(good[2])):
        producer.send_raw(topic, key, value)
    producer.flush()

    # The consumer yields the three good events, in order, past the three bad ones.
    with EventConsumer(network, kafka, f"g-{uuid.uuid4()}", [topic]) as consumer:
        got = [d.event.event_id for d in consumer.stream(idle_timeout_s=5)]
        assert got == [e.event_id for e in good]
        assert consumer.dead_lettered == 3

    # Each bad record is on the dead-letter topic with its reason and original bytes.
    with EventConsumer(network, kafka, f"d-{uuid.uuid4()}", [dead_letter_topic(network)]) as dlq:
        letters = [d.event.fields for d in dlq.stream(idle_timeout_s=5)]
    assert [(x["error"], x["value"]) for x in letters] == [
        ("CorruptEvent", corrupt),
        ("UnknownSchema", unknown),
        ("InvalidEvent", out_of_range),
    ]
    assert all(x["source_topic"] == topic and x["key"] == key for x in letters)
    assert "0000000000000000" in letters[1]["reason"]
    assert "load_permille" in letters[2]["reason"]
    offsets = [x["source_offset"] for x in letters]
    assert offsets == sorted(offsets) and len(set(offsets)) == 3
    # What was dead-lettered really is undecodable: the letter does not lie.
    for letter in letters:
        with pytest.raises(EventError):
            decode(letter["value"])
