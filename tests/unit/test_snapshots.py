"""Sealed state snapshots (``streams.kafka_runner``): signed, and old records still open."""

from __future__ import annotations

import pickle
import zlib

import pytest

from schemas.errors import StateError
from schemas.signatures import KeyPair
from streams.kafka_runner import open_snapshot, seal_snapshot

STATE = {"positions": {("t.tasks.submitted", 3): 1234}, "states": {"verifier": b"\x00" * 100}}


def test_a_sealed_snapshot_opens_with_its_services_key_only() -> None:
    keys, other = KeyPair.generate(), KeyPair.generate()
    sealed = seal_snapshot(STATE, keys)
    assert sealed.startswith(b"DSNP2")
    assert open_snapshot(sealed, keys.signing_public) == STATE
    with pytest.raises(StateError, match="not signed"):
        open_snapshot(sealed, other.signing_public)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(StateError, match="not signed"):
        open_snapshot(tampered, keys.signing_public)
    with pytest.raises(StateError, match="not a Destra"):
        open_snapshot(b"DSNP9" + sealed[5:], keys.signing_public)


def test_a_record_sealed_by_the_previous_format_still_opens() -> None:
    """DSNP1 (zlib-compressed pickle), written by a network before the upgrade."""
    keys = KeyPair.generate()
    body = zlib.compress(pickle.dumps(STATE), 1)
    old = b"DSNP1" + keys.sign(body) + body
    assert open_snapshot(old, keys.signing_public) == STATE
