"""The single-object codec: exact round trips, the official library agrees, bad bytes are named."""

from __future__ import annotations

import io
import json
from typing import Any

import avro.io
import avro.schema
import pytest

from destra.errors import CorruptEvent, InvalidEvent, UnknownSchema
from schemas import Event, decode, default_catalog, encode, new_event
from schemas.samples import SAMPLE_TIME_MS, encode_unchecked, sample_event, with_fields

NAMES = default_catalog().names


def _official_schema(name: str) -> avro.schema.Schema:
    return avro.schema.parse(json.dumps(default_catalog().schema_json(name)))


@pytest.mark.parametrize("name", NAMES)
def test_every_sample_event_round_trips_exactly(name: str) -> None:
    event = sample_event(name)
    assert decode(encode(event)) == event


@pytest.mark.parametrize("name", NAMES)
def test_bytes_are_the_marker_the_writer_fingerprint_and_the_body(name: str) -> None:
    data = encode(sample_event(name))
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == default_catalog().fingerprint(name)
    assert data[2:10] == _official_schema(name).fingerprint("CRC-64-AVRO")


@pytest.mark.parametrize("name", NAMES)
def test_our_bytes_decode_with_the_official_avro_library(name: str) -> None:
    event = sample_event(name)
    body = io.BytesIO(encode(event)[10:])
    official = avro.io.DatumReader(_official_schema(name)).read(avro.io.BinaryDecoder(body))
    assert official == event.fields
    assert body.read() == b"", "the official reader consumed the whole body"


@pytest.mark.parametrize("name", NAMES)
def test_official_avro_library_bytes_decode_with_our_codec(name: str) -> None:
    event = sample_event(name)
    schema = _official_schema(name)
    body = io.BytesIO()
    avro.io.DatumWriter(schema).write(dict(event.fields), avro.io.BinaryEncoder(body))
    data = b"\xc3\x01" + schema.fingerprint("CRC-64-AVRO") + body.getvalue()
    assert decode(data) == event


def test_wire_bytes_of_a_sample_heartbeat_are_pinned() -> None:
    event = sample_event("NodeHeartbeat", event_id="00000000-0000-4000-8000-000000000001",
                         occurred_at=SAMPLE_TIME_MS)
    pinned = bytes.fromhex(
        "c301"  # single-object marker
        "33b245b95c3c57cb"  # CRC-64-AVRO of NodeHeartbeat's canonical form, little-endian
        "48" + b"00000000-0000-4000-8000-000000000001".hex()  # envelope.event_id
        + "80accc87d966"  # envelope.occurred_at = 1764300000000 (zigzag varint)
        "1e" + b"sample-producer".hex()  # envelope.producer_id
        + "00"  # envelope.signature = null
        "00"  # envelope.signer = null
        "12" + b"node-3f9c".hex()  # node_id
        + "c806"  # load_permille = 420
        "02"  # free_slots = 1
        "f214"  # seq = 1337
    )
    assert encode(event) == pinned
    assert decode(pinned) == event


@pytest.mark.parametrize("data", [
    b"",
    b"\xc3",
    b"\xc3\x01" + bytes(7),
    b"\x00\x01" + bytes(8) + b"\x02",
    b'{"json": "is not avro"}',
])
def test_bytes_without_a_single_object_header_are_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptEvent):
        decode(data)


def test_every_truncation_of_an_event_is_corrupt() -> None:
    data = encode(sample_event("TaskVerified"))
    for end in range(10, len(data)):
        with pytest.raises(CorruptEvent):
            decode(data[:end])


def test_garbage_after_a_known_fingerprint_is_corrupt() -> None:
    valid = encode(sample_event("NodeHeartbeat"))
    for garbage in (b"\xff" * 5, b"\xff" * 40, b"\x01" + valid[11:]):
        with pytest.raises(CorruptEvent, match="NodeHeartbeat"):
            decode(valid[:10] + garbage)


def test_bytes_after_the_body_are_corrupt() -> None:
    with pytest.raises(CorruptEvent, match="2 bytes after the body"):
        decode(encode(sample_event("NodeHeartbeat")) + b"\x00\x00")


def test_an_unknown_fingerprint_raises_unknown_schema_showing_its_hex() -> None:
    valid = encode(sample_event("NodeHeartbeat"))
    with pytest.raises(UnknownSchema, match="0000000000000000"):
        decode(b"\xc3\x01" + bytes(8) + valid[10:])
    with pytest.raises(UnknownSchema, match="0102030405060708"):
        decode(b"\xc3\x01" + bytes(range(1, 9)) + valid[10:])


def test_an_unknown_event_type_cannot_be_encoded() -> None:
    with pytest.raises(UnknownSchema, match="TaskDreamedUp"):
        encode(Event("TaskDreamedUp", {"envelope": {}}))


@pytest.mark.parametrize(("name", "changes", "expected"), [
    ("NodeHeartbeat", {"load_permille": 1001}, "load_permille = 1001: out of range 0..1000"),
    ("NodeHeartbeat", {"load_permille": -1}, "load_permille = -1: out of range 0..1000"),
    ("NodeHeartbeat", {"node_id": ""}, "node_id = '': length 0 out of range 1..128"),
    ("TaskSubmitted", {"replicas": 16}, "replicas = 16: out of range 1..15"),
    ("TaskSubmitted", {"replicas": 0}, "replicas = 0: out of range 1..15"),
    ("TaskSubmitted", {"max_price_micro": -1}, "max_price_micro = -1: out of range"),
    ("TaskSubmitted", {"region": ""}, "region = '': length 0"),
    ("TaskSubmitted", {"result_key": bytes(31)}, "result_key = b'"),
    ("TokensMinted", {"amount_micro": 0}, "amount_micro = 0: out of range 1.."),
    ("ResultCommitted", {"commitment": bytes(33)}, "commitment = b'"),
    ("DeadLettered", {"source_offset": -5}, "source_offset = -5: out of range"),
    ("VoteCast", {"weight_micro": -(2**64)}, "weight_micro = -18446744073709551616: out of range"),
    ("NodeRegistered", {"slots": 2**31}, "slots = 2147483648: out of range 1..1024"),
])
def test_an_out_of_range_value_is_refused_naming_event_field_and_value(
    name: str, changes: dict[str, Any], expected: str
) -> None:
    with pytest.raises(InvalidEvent, match="^" + name + ": .*") as raised:
        encode(with_fields(sample_event(name), **changes))
    assert expected in str(raised.value)


def test_a_nested_out_of_range_value_is_named_by_its_path() -> None:
    event = sample_event("TaskVerified")
    contributions = [dict(c) for c in event.fields["contributions"]]
    contributions[1]["compute_units"] = -5
    with pytest.raises(InvalidEvent, match=r"contributions\[1\]\.compute_units = -5"):
        encode(event.replace(contributions=contributions))
    with pytest.raises(InvalidEvent, match=r"envelope\.event_id = 'short'"):
        encode(event.with_envelope(event_id="short"))


def test_the_signed_ledger_amount_may_be_negative() -> None:
    debit = with_fields(sample_event("LedgerEntryPosted"), amount_micro=-(2**62))
    assert decode(encode(debit)).fields["amount_micro"] == -(2**62)


@pytest.mark.parametrize("amount", [1.5, 2.0, True, "5", None])
def test_money_that_is_not_an_int_is_refused(amount: object) -> None:
    with pytest.raises(InvalidEvent, match="max_price_micro = .*not an integer"):
        encode(with_fields(sample_event("TaskSubmitted"), max_price_micro=amount))


@pytest.mark.parametrize(("field", "value"), [
    ("workload", 5),
    ("workload", b"digits-mlp"),
    ("result_key", "a string, not bytes, of thirty-two"),
    ("params", {"epochs": 5}),
    ("homogeneous", "yes"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidEvent, match=field):
        encode(with_fields(sample_event("TaskSubmitted"), **{field: value}))


def test_an_unknown_enum_symbol_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="choice"):
        encode(with_fields(sample_event("VoteCast"), choice="MAYBE"))


def test_missing_and_misspelt_fields_are_refused() -> None:
    event = sample_event("NodeHeartbeat")
    without_seq = Event(event.name, {k: v for k, v in event.fields.items() if k != "seq"})
    with pytest.raises(InvalidEvent, match="missing seq"):
        encode(without_seq)
    with pytest.raises(InvalidEvent, match="unknown load_permile"):
        encode(event.replace(load_permile=5))


def test_out_of_range_bytes_on_the_wire_decode_to_invalid_event() -> None:
    data = encode_unchecked(with_fields(sample_event("NodeHeartbeat"), load_permille=5000))
    with pytest.raises(InvalidEvent, match="load_permille = 5000"):
        decode(data)


def test_new_event_fills_the_envelope_and_the_defaults() -> None:
    event = new_event("TaskFailed", "verifier-1", task_id="task-1", reason="no_quorum", detail="")
    assert event.producer_id == "verifier-1"
    assert len(event.event_id) == 36 and event.event_id[14] == "4"
    assert isinstance(event.occurred_at, int) and event.occurred_at > SAMPLE_TIME_MS
    assert event.signature is None and event.signer is None
    submitted = sample_event("TaskSubmitted")
    fresh = new_event("TaskSubmitted", "client", **{
        k: v for k, v in submitted.body.items() if k not in ("homogeneous", "region")})
    assert fresh.fields["homogeneous"] is False and fresh.fields["region"] is None
    assert decode(encode(fresh)) == fresh


def test_a_signed_envelope_round_trips() -> None:
    event = sample_event("ResultCommitted").with_envelope(signature=bytes(64), signer="node-3f9c")
    back = decode(encode(event))
    assert back.signature == bytes(64) and back.signer == "node-3f9c"
    assert back == event


def test_events_of_one_sample_get_fresh_envelopes_and_equal_bodies() -> None:
    a, b = sample_event("TaskAssigned"), sample_event("TaskAssigned")
    assert a.event_id != b.event_id
    assert a.body == b.body
