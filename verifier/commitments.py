"""Result commitments: ``H(salt, digest)`` bound to the task, the node and the attempt.

A node publishes ``commitment(...)`` first and ``(salt, digest)`` later. Binding
the task, node and attempt into the hash means a commitment cannot be replayed
by another node, for another task or for a re-issued attempt; the random salt
hides the digest until the reveal, so a node cannot test a guess against
another node's commitment. Every field is length-prefixed, so no two different
inputs encode to the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

DOMAIN = b"destra/commit/v1"
"""Domain separation: these hashes can never collide with another use of SHA-256."""

SALT_BYTES = 32
MAX_ATTEMPT = 2**31 - 1  # Avro int


def _field(value: bytes) -> bytes:
    """``value`` with a 4-byte big-endian length in front."""
    return len(value).to_bytes(4, "big") + value


def commitment(task_id: str, node_id: str, attempt: int, salt: bytes, digest: bytes) -> bytes:
    """The 32-byte commitment a node publishes before it reveals ``salt`` and ``digest``."""
    if not 0 <= attempt <= MAX_ATTEMPT:
        raise ValueError(f"attempt {attempt} out of range 0..{MAX_ATTEMPT}")
    encoded = b"".join((
        _field(DOMAIN),
        _field(task_id.encode("utf-8")),
        _field(node_id.encode("utf-8")),
        attempt.to_bytes(4, "big"),
        _field(bytes(salt)),
        _field(bytes(digest)),
    ))
    return hashlib.sha256(encoded).digest()


def matches(expected: bytes, task_id: str, node_id: str, attempt: int,
            salt: bytes, digest: bytes) -> bool:
    """Whether a reveal opens ``expected``; compared in constant time."""
    return hmac.compare_digest(expected, commitment(task_id, node_id, attempt, salt, digest))


def new_salt() -> bytes:
    """32 fresh random bytes for one commitment; the only non-deterministic helper here."""
    return secrets.token_bytes(SALT_BYTES)
