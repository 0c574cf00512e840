"""Fuzzing the event decoders: random bytes, mutated valid encodings of every event type,
boundary values, huge fields and unicode. Every input decodes, or is refused with an
``EventError``; nothing else escapes, and what the writer refuses the reader refuses too.

The long run: ``bench/fuzz.py`` (``tests/unit/fuzzing.py`` has the profiles).
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from schemas import Event
from schemas.catalog import MARKER, default_catalog
from schemas.codec import decode, encode, encode_unchecked, signature_span, unsigned_bytes
from schemas.errors import EventError, InvalidEvent
from schemas.samples import sample_event, with_fields
from schemas.signatures import sign_event, verify_event
from tests.support import account_keys
from tests.unit.fuzzing import count, fuzzed_fields, known_fingerprints, mutated, values

NAMES = sorted(default_catalog().names)
KEYS = account_keys("fuzz")


def _decode_or_refuse(data: bytes) -> Event | None:
    """Decode ``data`` as every consumer does: the event, or None for an ``EventError``."""
    try:
        event = decode(data)
    except EventError:
        return None
    # What the consumer does next with a decoded record: its signature span and check.
    assert event.raw is not None
    signature_span(event.raw)
    unsigned_bytes(event.raw)
    verify_event(event, KEYS.signing_public, "fuzz")
    return event


def _envelope_tools(data: bytes) -> None:
    """The envelope readers refuse what they cannot find, with ``CorruptEvent``."""
    try:
        signature_span(data)
        unsigned_bytes(data)
    except EventError:
        pass


@given(st.binary(max_size=300))
def test_random_bytes_are_refused_or_decoded(data: bytes) -> None:
    count("decode: random bytes")
    _decode_or_refuse(data)
    _envelope_tools(data)


@given(st.sampled_from(known_fingerprints()), st.binary(max_size=300))
def test_a_known_fingerprint_with_a_random_body_is_refused_or_decoded(
        fingerprint: bytes, body: bytes) -> None:
    count("decode: known fingerprint + random body")
    _decode_or_refuse(MARKER + fingerprint + body)
    _envelope_tools(MARKER + fingerprint + body)


@st.composite
def _mutated_encoding(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(NAMES))
    event = sample_event(name, event_id="00000000-0000-4000-8000-000000000000",
                         occurred_at=1_764_300_000_000)
    if draw(st.booleans()):
        event = sign_event(event, KEYS, "fuzz")
    return name, draw(mutated(encode(event)))


@given(_mutated_encoding())
def test_mutated_encodings_of_every_event_type_are_refused_or_decoded(
        case: tuple[str, bytes]) -> None:
    count("decode: mutated valid encodings")
    _decode_or_refuse(case[1])
    _envelope_tools(case[1])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@st.composite
def _fuzzed_event(draw: st.DrawFn, wrong_types: bool) -> Event:
    name = draw(st.sampled_from(NAMES))
    event = with_fields(sample_event(name), **draw(fuzzed_fields(name, wrong_types=wrong_types)))
    if draw(st.integers(0, 3)) == 0:  # the envelope too
        schema = next(f["type"] for f in default_catalog().schema_json(name)["fields"]
                      if f["name"] == "envelope")
        changed = draw(values(schema, wrong_types=wrong_types))
        event = Event(event.name, {**event.fields, "envelope": changed})
    return event


@given(_fuzzed_event(wrong_types=False))
def test_boundary_huge_and_unicode_values_round_trip_or_are_refused_by_both_sides(
        event: Event) -> None:
    """``encode`` refuses with ``InvalidEvent``, or the bytes decode to the same fields;
    bytes written without the checks decode only if ``encode`` would have taken them."""
    count("encode/decode: fuzzed field values")
    try:
        data = encode(event)
    except InvalidEvent:
        try:
            raw = encode_unchecked(event)
        except InvalidEvent:
            return  # the writer cannot write it at all (a lone surrogate...)
        assert _decode_or_refuse(raw) is None, f"decode took what encode refused: {event}"
        return
    decoded = _decode_or_refuse(data)
    assert decoded is not None, f"decode refused what encode wrote: {event}"
    assert _same(decoded.fields, event.fields)


@given(_fuzzed_event(wrong_types=True))
def test_values_of_the_wrong_type_are_refused_by_the_encoder(event: Event) -> None:
    count("encode: wrong-typed field values")
    try:
        data = encode(event)
    except InvalidEvent:
        return
    assert _decode_or_refuse(data) is not None
