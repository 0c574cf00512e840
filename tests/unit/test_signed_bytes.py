"""Signatures cover the exact bytes written: any schema version, any map layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastavro import parse_schema, schemaless_writer

from destra.crypto import KeyPair, sign_encoded, sign_event, signed_bytes, verify_event
from schemas import decode, default_catalog, encode
from schemas.catalog import AVSC_DIR, HISTORY_DIR, MARKER
from schemas.codec import signature_span, unsigned_bytes
from schemas.samples import sample_event

ENVELOPE_PREFIX = [("event_id", "string"), ("occurred_at", "long"),
                   ("producer_id", "string"), ("signature", ["null", "bytes"])]

KEYS = KeyPair.generate()


def _zigzag(n: int) -> bytes:
    """An Avro long: zig-zag, then a little-endian base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _string(s: str) -> bytes:
    return _zigzag(len(s.encode())) + s.encode()


def _schema_files() -> list[str]:
    files = [p for p in AVSC_DIR.glob("*.avsc") if p.stem != "Envelope"]
    return sorted(str(p) for p in files + list(HISTORY_DIR.glob("*/v*.avsc")))


@pytest.mark.parametrize("path", _schema_files())
def test_every_schema_opens_with_the_envelope_prefix_signatures_are_found_by(path: str) -> None:
    schema = json.loads(Path(path).read_text())
    envelope = schema["fields"][0]
    assert envelope["name"] == "envelope"
    if envelope["type"] == "network.destra.Envelope":  # current schemas name it; inline it
        envelope = {"type": json.loads((AVSC_DIR / "Envelope.avsc").read_text())}
    prefix = [(f["name"], f["type"]) for f in envelope["type"]["fields"][:4]]
    assert prefix == ENVELOPE_PREFIX


def test_a_signed_event_verifies_after_a_round_trip_and_a_flipped_byte_fails() -> None:
    event = sign_event(sample_event("TaskVerified"), KEYS, "verifier")
    data = encode(event)
    decoded = decode(data)
    assert decoded.raw == data and decoded == event
    assert verify_event(decoded, KEYS.signing_public, "verifier")
    start, end = signature_span(data)
    for i in (len(data) - 1, 5, 12, end + 3):  # body, fingerprint, event id, after the union
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        try:
            tampered = decode(bytes(flipped))
        except Exception:  # noqa: S112 - a flip the codec itself refuses is fine too
            continue
        assert not verify_event(tampered, KEYS.signing_public, "verifier")
    assert not verify_event(decoded, KeyPair.generate().signing_public)


def test_the_signed_message_is_the_written_bytes_with_a_null_signature_union() -> None:
    event = sign_event(sample_event("TokensMinted"), KEYS, "treasury")
    data = encode(event)
    start, end = signature_span(data)
    assert data[start:start + 3] == b"\x02\x80\x01" and end - start == 3 + 64
    assert data[start + 3:end] == event.signature
    assert signed_bytes(decode(data)) == data[:start] + b"\x00" + data[end:]
    assert unsigned_bytes(data) == encode(event.with_envelope(signature=None))


def test_an_event_written_under_an_old_schema_version_verifies_read_with_the_current_one() -> None:
    catalog = default_catalog()
    old = catalog.history("TaskAssigned")[0]
    assert old.fingerprint != catalog.fingerprint("TaskAssigned")
    current = sample_event("TaskAssigned").with_envelope(signer="allocator")
    old_names = {f["name"] for f in old.json["fields"]}
    record = {k: v for k, v in current.fields.items() if k in old_names}
    buffer = io.BytesIO()
    buffer.write(MARKER + old.fingerprint)
    schemaless_writer(buffer, parse_schema(json.loads(json.dumps(old.json))), record)
    data = sign_encoded(buffer.getvalue(), KEYS)

    decoded = decode(data)
    assert decoded.name == "TaskAssigned" and set(decoded.fields) > old_names
    assert verify_event(decoded, KEYS.signing_public, "allocator")
    # A re-encoding under the current schema is other bytes: it would not verify.
    rebuilt = decoded.with_envelope()
    assert not verify_event(rebuilt, KEYS.signing_public, "allocator")


def test_a_map_written_in_another_order_and_layout_verifies() -> None:
    event = sample_event("TaskSubmitted").replace(params={"a": "1", "b": "2"})
    event = event.with_envelope(signer="alice")
    plain = encode(event)
    # The map as fastavro writes it: one block of two entries. Another writer may
    # write b before a, in two blocks, the first with a negative count and its size.
    as_written = _zigzag(2) + _string("a") + _string("1") + _string("b") + _string("2") + b"\0"
    entry_b = _string("b") + _string("2")
    other = (_zigzag(-1) + _zigzag(len(entry_b)) + entry_b
             + _zigzag(1) + _string("a") + _string("1") + b"\0")
    assert plain.count(as_written) == 1
    data = sign_encoded(plain.replace(as_written, other), KEYS)

    decoded = decode(data)
    assert decoded.fields["params"] == {"a": "1", "b": "2"}
    assert decoded == event.with_envelope(signature=decoded.signature)
    assert verify_event(decoded, KEYS.signing_public, "alice")
    assert not verify_event(decoded.with_envelope(), KEYS.signing_public, "alice")
    flipped = bytearray(data)
    flipped[data.index(b"\x02b\x022") + 3] = ord("3")  # the value of b: "2" -> "3"
    assert not verify_event(decode(bytes(flipped)), KEYS.signing_public, "alice")


def test_signatures_made_before_decoding_still_verify_after() -> None:
    """Outside parties sign an event built in memory; receivers check the bytes."""
    event = sign_event(sample_event("ResultCommitted"), KEYS, "node-3f9c")
    assert verify_event(event, KEYS.signing_public, "node-3f9c")
    assert verify_event(decode(encode(event)), KEYS.signing_public, "node-3f9c")
