"""Avro single-object encoding: ``C3 01``, the writer schema's 8-byte fingerprint, the body.

The fingerprint is CRC-64-AVRO of the writer schema's Parsing Canonical Form,
little-endian, as the Avro specification and the Java implementation write it.
Decoding looks the fingerprint up among the current and every released schema
and resolves the writer's schema into the current one of that event type.

Everything per schema (parsed schema, header, range checker) is built once by
the catalogue; a call does no JSON parsing.
"""

from __future__ import annotations

import io
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError, validate

from schemas.catalog import MARKER, Catalog, Writing, default_catalog
from schemas.errors import CorruptEvent, InvalidEvent
from schemas.events import Event

HEADER_SIZE = 10
"""Marker (2 bytes) and fingerprint (8 bytes)."""


def encode(event: Event, *, catalog: Catalog | None = None) -> bytes:
    """The event as single-object encoded bytes; raises InvalidEvent naming field and value."""
    writing = (catalog or default_catalog()).writing(event.name)
    problem = writing.check(event.fields)
    if problem is not None:
        raise InvalidEvent(f"{event.name}: {problem}")
    return _write(writing, event)


def encode_unchecked(event: Event, *, catalog: Catalog | None = None) -> bytes:
    """Encode without the range checks: for tests that need out-of-range bytes on the wire."""
    return _write((catalog or default_catalog()).writing(event.name), event)


def decode(data: bytes, *, catalog: Catalog | None = None) -> Event:
    """The event in single-object encoded bytes, resolved to the current schema.

    Raises CorruptEvent (not single-object Avro, truncated, garbage),
    UnknownSchema (a fingerprint no current or released schema has) or
    InvalidEvent (well-formed, but a value breaks its declared range).
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) < HEADER_SIZE or data[:2] != MARKER:
        raise CorruptEvent(f"not an Avro single-object encoded event: starts {data[:10].hex()!r}")
    reading = (catalog or default_catalog()).reading(data[2:HEADER_SIZE])
    buffer = io.BytesIO(data)
    buffer.seek(HEADER_SIZE)
    try:
        record: Any = schemaless_reader(buffer, reading.writer, reading.reader)
    except Exception as e:  # any failure to parse garbage means corrupt input
        raise CorruptEvent(
            f"{reading.name}: body does not decode ({type(e).__name__}: {e})"
        ) from e
    if buffer.tell() != len(data):
        raise CorruptEvent(f"{reading.name}: {len(data) - buffer.tell()} bytes after the body")
    problem = reading.check(record)
    if problem is not None:
        raise InvalidEvent(f"{reading.name}: {problem}")
    return Event(reading.name, record, data)


def _write(writing: Writing, event: Event) -> bytes:
    buffer = io.BytesIO()
    buffer.write(writing.header)
    try:
        schemaless_writer(buffer, writing.parsed, event.fields)
    except Exception as e:  # fastavro raises several types for a bad datum
        raise InvalidEvent(f"{event.name}: {_explain(writing.parsed, event.fields, e)}") from e
    return buffer.getvalue()


def _explain(parsed: Any, record: Any, error: Exception) -> str:
    """fastavro's validator names the field path and value; its writer often does not."""
    try:
        validate(record, parsed, raise_errors=True, strict=True)
    except ValidationError as e:
        return "; ".join(str(m) for m in e.errors)
    except Exception:  # noqa: S110 - fall back to the writer's own message
        pass
    return f"{type(error).__name__}: {error}"


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro ``long`` (zig-zag varint) at ``pos``: (value, position after it)."""
    shift = result = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CorruptEvent("truncated or overlong varint in the envelope")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos


def _skip_bytes(data: bytes, pos: int) -> int:
    """Skip an Avro ``string`` or ``bytes`` (a long length, then that many bytes)."""
    length, pos = _read_long(data, pos)
    if length < 0 or pos + length > len(data):
        raise CorruptEvent("bad length in the envelope")
    return pos + length


def signature_span(data: bytes) -> tuple[int, int]:
    """Where the envelope's ``signature`` union lies in single-object encoded ``data``.

    Every event schema opens with the envelope, whose first fields are
    ``event_id`` (string), ``occurred_at`` (long), ``producer_id`` (string) and
    ``signature`` (union [null, bytes]); so the union starts after the 10-byte
    header and those three values, whatever the schema version, and spans its
    branch index and, for the bytes branch, a length and the bytes.
    """
    if len(data) < HEADER_SIZE or data[:2] != MARKER:
        raise CorruptEvent("not an Avro single-object encoded event")
    pos = _skip_bytes(data, HEADER_SIZE)  # event_id
    _, pos = _read_long(data, pos)  # occurred_at
    pos = _skip_bytes(data, pos)  # producer_id
    start = pos
    branch, pos = _read_long(data, pos)
    if branch == 1:
        pos = _skip_bytes(data, pos)
    elif branch != 0:
        raise CorruptEvent(f"signature union branch {branch} is neither null nor bytes")
    return start, pos


NULL_BRANCH = b"\x00"
"""The signature union's null branch: index 0, a zig-zag varint."""


def unsigned_bytes(data: bytes) -> bytes:
    """``data`` with its envelope's signature union replaced by the null branch (one 0x00)."""
    start, end = signature_span(data)
    return data[:start] + NULL_BRANCH + data[end:]


def with_signature(data: bytes, signature: bytes) -> bytes:
    """``data`` with its envelope's signature union set to the bytes branch ``signature``."""
    start, end = signature_span(data)
    length = len(signature)
    encoded = bytearray(b"\x02")  # branch 1
    zigzag = length << 1
    while zigzag > 0x7F:
        encoded.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    encoded.append(zigzag)
    return data[:start] + bytes(encoded) + signature + data[end:]
