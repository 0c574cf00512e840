"""Every event type goes through the real broker and comes back intact."""

from __future__ import annotations

import io
import uuid

import avro.io
import avro.schema
import pytest
from confluent_kafka import Consumer

from destra.settings import Settings
from schemas import decode, default_catalog
from schemas.samples import sample_event
from streams.producer import EventProducer
from streams.security import client_config
from streams.topics import TOPICS

pytestmark = pytest.mark.integration


def _read_raw(bootstrap: str, topics: list[str], count: int) -> list[tuple[str, bytes]]:
    consumer = Consumer({**client_config(bootstrap), "group.id": f"raw-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe(topics)
    out: list[tuple[str, bytes]] = []
    try:
        for _ in range(600):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append((msg.topic(), msg.value()))
            if len(out) >= count:
                break
    finally:
        consumer.close()
    return out


def _official_avro_decode(data: bytes, schema_json: dict) -> dict:
    """Decode with the Apache avro library alone: header by hand, body by DatumReader."""
    schema = avro.schema.parse(__import__("json").dumps(schema_json))
    assert data[:2] == b"\xc3\x01", "single-object marker"
    assert data[2:10] == schema.fingerprint("CRC-64-AVRO"), "fingerprint per the official library"
    reader = avro.io.DatumReader(schema)
    return reader.read(avro.io.BinaryDecoder(io.BytesIO(data[10:])))


def test_every_event_type_round_trips_through_the_broker(network: Settings, kafka: str) -> None:
    catalog = default_catalog()
    sent = {e.event_id: e for e in (sample_event(name) for name in catalog.names)}
    assert len(sent) == len(catalog.names) >= 16

    # Produce one event of every type, each to its catalogue topic.
    with EventProducer(network, kafka) as producer:
        for event in sent.values():
            producer.send(event)

    # Read the raw bytes back from every topic.
    raw = _read_raw(kafka, [t.name(network.topic_prefix) for t in TOPICS], len(sent))
    assert len(raw) == len(sent)

    for topic, data in raw:
        event = decode(data)
        original = sent[event.event_id]
        # fastavro: exact round trip, on the topic the catalogue names.
        assert event == original
        assert topic.endswith(next(t.suffix for t in TOPICS if event.name in t.events))
        # The official avro library reads the very same bytes to the same values.
        official = _official_avro_decode(data, catalog.schema_json(event.name))
        assert official["envelope"]["event_id"] == original.event_id
        body = {k: v for k, v in official.items() if k != "envelope"}
        expected = {k: v for k, v in original.fields.items() if k != "envelope"}
        assert body == expected, event.name
