"""A valid, realistic event of every type, for tests and benchmarks.

Bodies are fixed values; each call gets a fresh envelope (new event id, now)
unless ``event_id`` and ``occurred_at`` are given, which pins the bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from schemas.codec import encode_unchecked
from schemas.events import Event, new_event

__all__ = ["SAMPLE_TIME_MS", "encode_unchecked", "sample_event", "with_fields"]

SAMPLE_TIME_MS = 1_764_300_000_000
"""A fixed instant (2025-11-28 03:20 UTC) the sample bodies' timestamps count from."""


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _key(label: str) -> bytes:
    """32 bytes standing in for a public key (sample data, not a real key)."""
    return _sha256(f"sample key {label}")


_DIGEST = _sha256("digits-mlp task-7f3a output")
_SALT = bytes(range(16))

_BODIES: dict[str, Callable[[], dict[str, Any]]] = {
    "NodeRegistered": lambda: {
        "node_id": "node-3f9c", "operator_id": "op-lisbon-lab", "region": "eu-west",
        "signing_key": _key("node-3f9c signing"), "encryption_key": _key("node-3f9c x25519"),
        "device_name": "NVIDIA GeForce RTX 4090", "device_class": "cuda-sm89",
        "tier": "consumer", "tflops_milli": 82_580, "memory_mb": 24_564, "slots": 2,
        "stake_micro": 250_000_000, "software": "destra 0.1.0; torch 2.15.0; cuda 13.0",
    },
    "NodeHeartbeat": lambda: {
        "node_id": "node-3f9c", "load_permille": 420, "free_slots": 1, "seq": 1_337,
    },
    "TaskSubmitted": lambda: {
        "task_id": "task-7f3a", "submitter_id": "alice", "workload": "digits-mlp",
        "params": {"epochs": "5", "hidden": "64", "lr": "0.01", "seed": "42"},
        "replicas": 3, "quorum": 2, "compute_units": 1_200,
        "max_price_micro": 5_000_000, "quote_id": "quote-91c2",
        "quoted_price_micro": 3_600_000, "quote_expires_at": SAMPLE_TIME_MS + 60_000,
        "tier": "consumer", "region": "eu-west", "homogeneous": False,
        "deadline_ms": 600_000, "result_key": _key("alice x25519"),
        "payload_ref": None, "payload": b"\x8a\x1f" + bytes(range(60)),
        "signing_key": _key("alice signing"),
        "data_key_commitment": _sha256("data key of task-7f3a"),
    },
    "TaskAssigned": lambda: {
        "task_id": "task-7f3a", "node_id": "node-3f9c", "replica_index": 0, "attempt": 0,
        "commit_deadline": SAMPLE_TIME_MS + 300_000,
        "reveal_deadline": SAMPLE_TIME_MS + 360_000, "workload": "mlp-digits",
        "params": {"epochs": "5", "seed": "42"}, "compute_units": 1_200,
        "task_deadline": SAMPLE_TIME_MS + 600_000, "payload": None,
        "payload_ref": "blob:sha256:" + _sha256("payload").hex(), "submitter_id": "alice",
        "submitter_key": _key("alice signing"), "result_key": _key("alice x25519"),
        "predicted_runtime_ms": 47_500,
    },
    "RevealOpened": lambda: {
        "task_id": "task-7f3a", "node_id": "node-3f9c", "attempt": 0,
        "opened_at": SAMPLE_TIME_MS + 120_000, "reveal_deadline": SAMPLE_TIME_MS + 360_000,
    },
    "CheckpointRequested": lambda: {
        "task_id": "task-7f3a", "node_id": "node-3f9c", "attempt": 0, "checkpoint": 3,
        "reply_by": SAMPLE_TIME_MS + 420_000,
    },
    "CheckpointProvided": lambda: {
        "task_id": "task-7f3a", "node_id": "node-3f9c", "attempt": 0, "checkpoint": 3,
        "state": b'{"checkpoint":1,"fields":{"step":33}}',
    },
    "ReissueRequested": lambda: {
        "task_id": "task-7f3a", "replica_index": 2, "attempt": 1,
        "exclude_node_ids": ["node-3f9c", "node-77aa", "node-c001"],
    },
    "DataKeyGranted": lambda: {
        "task_id": "task-7f3a", "node_id": "node-3f9c",
        "wrapped_key": _sha256("wrapped")[:28] + _sha256("tag")[:16] + bytes(12),
        "ephemeral_public_key": _key("alice ephemeral"), "attempt": 0,
    },
    "ResultCommitted": lambda: {
        "task_id": "task-7f3a", "node_id": "node-3f9c", "attempt": 0,
        "commitment": hashlib.sha256(_SALT + _DIGEST).digest(),
    },
    "ResultRevealed": lambda: {
        "task_id": "task-7f3a", "node_id": "node-3f9c", "attempt": 0, "salt": _SALT,
        "digest": _DIGEST, "runtime_ms": 48_210, "result_ref": None,
        "result": bytes(32) + b"\x01" + bytes(12) + _sha256("ciphertext") + bytes(16),
    },
    "TaskVerified": lambda: {
        "task_id": "task-7f3a", "digest": _DIGEST, "quorum": 2,
        "contributions": [
            {"node_id": "node-3f9c", "compute_units": 1_200, "agreed": True},
            {"node_id": "node-a771", "compute_units": 1_200, "agreed": True},
            {"node_id": "node-0b12", "compute_units": 0, "agreed": False},
        ],
        "result_ref": "kafka://destra.results/task-7f3a/node-3f9c",
    },
    "TaskFailed": lambda: {
        "task_id": "task-7f3a", "reason": "no_quorum",
        "detail": "2 of 3 replicas revealed; their digests differ",
    },
    "NodePenalized": lambda: {
        "node_id": "node-0b12", "task_id": "task-7f3a", "reason": "dissent",
        "slash_micro": 5_000_000, "reputation_permille": 50,
    },
    "LedgerEntryPosted": lambda: {
        "entry_id": "entry-5521-1", "transaction_id": "tx-5521", "account": "submitter:alice",
        "amount_micro": -3_600_000, "kind": "escrow", "task_id": "task-7f3a",
        "memo": "escrow for task-7f3a at quote-91c2",
    },
    "AccountRegistered": lambda: {
        "account_id": "alice", "signing_key": _key("alice signing"),
        "encryption_key": _key("alice x25519"),
    },
    "DataKeyRefused": lambda: {
        "task_id": "task-7f3a", "node_id": "node-3f9c", "attempt": 0,
        "grant_id": "5d1f3a52-2f7e-4d8a-9c4b-1e0f6a7b8c9d", "grant_key": _key("grant kek"),
    },
    "TokensMinted": lambda: {
        "account": "submitter:alice", "amount_micro": 100_000_000, "reason": "faucet",
    },
    "AccountOperation": lambda: {
        "account": "op-lisbon-lab", "nonce": 1_764_300_000_000, "operation": "TRANSFER",
        "target": "alice", "amount_micro": 5_000_000, "memo": "rent, November",
    },
    "PriceUpdated": lambda: {
        "tier": "consumer", "price_per_unit_micro": 3_000,
        "effective_at": SAMPLE_TIME_MS + 1_000,
    },
    "ProposalSubmitted": lambda: {
        "proposal_id": "prop-12", "proposer_id": "op-lisbon-lab",
        "title": "Lower the network fee to 2%",
        "description": "Fees have covered operations for three months; pass the surplus on.",
        "parameter": "fee_bps", "new_value": "200",
        "voting_ends_at": SAMPLE_TIME_MS + 7 * 86_400_000, "deposit_micro": 10_000_000,
    },
    "VoteCast": lambda: {
        "proposal_id": "prop-12", "voter_id": "op-lisbon-lab", "choice": "YES",
        "weight_micro": 250_000_000, "ballot": None,
    },
    "ProposalDecided": lambda: {
        "proposal_id": "prop-12", "outcome": "PASSED", "yes_micro": 300_000_000,
        "no_micro": 100_000_000, "abstain_micro": 0, "bonded_micro": 900_000_000,
        "ballots": 4, "deposit": "REFUND", "detail": "yes 75.0% of yes + no > 50.0%",
    },
    "ParameterChanged": lambda: {
        "parameter": "fee_bps", "value": 200, "effective_at": SAMPLE_TIME_MS + 1_000,
        "proposal_id": "prop-12",
    },
    "DeadLettered": lambda: {
        "source_topic": "destra.tasks", "source_partition": 3, "source_offset": 1_024,
        "key": b"task-7f3a", "value": b"\xc3\x01" + bytes(8) + b"\x02",
        "reason": "unknown schema fingerprint 0000000000000000", "error": "UnknownSchema",
    },
}


def sample_event(
    name: str,
    *,
    producer_id: str = "sample-producer",
    event_id: str | None = None,
    occurred_at: int | None = None,
) -> Event:
    """A valid event of the given type with realistic values."""
    return new_event(name, producer_id, event_id=event_id, occurred_at=occurred_at,
                     **_BODIES[name]())


def with_fields(event: Event, **fields: Any) -> Event:
    """A copy of an event with some of its own fields changed (the envelope stays)."""
    return event.replace(**fields)
