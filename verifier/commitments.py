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
import re
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


REFUSAL_DOMAIN = b"destra-refusal\0"
"""Prefix of a refusal's digest: no workload output hashes to ``sha256(prefix + code)``
unless it begins with these bytes, and a canonical output never does."""

REFUSAL_CODE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
"""A refusal code (``workloads.base.WorkRefused.code``): a short ``word-like-this``."""


def refusal_digest(code: str) -> bytes:
    """The digest a replica commits to and reveals when the workload refuses the task with
    ``code`` (``ResultRevealed.refusal``): the same on every honest node, so a quorum can
    agree on it, and public, so the verifier can tell a refusal from a result."""
    return hashlib.sha256(REFUSAL_DOMAIN + code.encode("utf-8")).digest()


def refusal_code(code: str) -> str:
    """``code`` as a well-formed refusal code: itself when it is one, else a stable
    stand-in (``invalid-code-`` and a hash of it), so even a workload that names its
    refusal badly is refused identically on every node."""
    if REFUSAL_CODE.fullmatch(code):
        return code
    return "invalid-code-" + hashlib.sha256(code.encode("utf-8", "replace")).hexdigest()[:16]


def matches_refusal(refusal: str | None, digest: bytes) -> bool:
    """Whether a reveal's ``refusal`` field agrees with its digest: none claimed, or a
    well-formed code that hashes to it."""
    if refusal is None:
        return True
    return REFUSAL_CODE.fullmatch(refusal) is not None and hmac.compare_digest(
        refusal_digest(refusal), bytes(digest))


def new_salt() -> bytes:
    """32 fresh random bytes for one commitment; the only non-deterministic helper here."""
    return secrets.token_bytes(SALT_BYTES)
