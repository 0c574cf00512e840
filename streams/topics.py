"""The topic catalogue: every topic, its key, partitions, cleanup and retention.

Source-of-truth topics keep every event forever (``retention.ms=-1``): the
ledger, the allocator's and the verifier's tables are rebuilt by replaying
them from offset 0. Topics that only hold the latest state per key are
compacted.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from schemas.events import Event

FOREVER = -1
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
"""The broker's default ``max.message.bytes``: the record size limit of a topic that does
not set its own (``TopicSpec.max_message_bytes``)."""
RECORD_OVERHEAD_BYTES = 256
"""What a record batch adds around one record's key and value (batch header, record
header, varints), rounded up: a record is checked against its topic's limit with it."""
DAY_MS = 24 * 3600 * 1000
INBOX_RETENTION_MS = 7 * DAY_MS
"""How long a node's inbox keeps its copies: a node back after a week finds nothing it
could still act on."""
JOURNAL_RETENTION_MS = 6 * 3600 * 1000
"""How long ``processors.journal`` keeps a batch's additions: far past the longest expiring
log's horizon (10 minutes), so a restart after an outage of hours still finds them."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic of the network."""

    suffix: str
    """Name without the network prefix (``DESTRA_TOPIC_PREFIX``)."""

    key: str
    """The record key: every event on the topic is keyed (and so ordered) by it."""

    events: tuple[str, ...]
    """Event types written to the topic."""

    partitions: int
    """Partition count; also the parallelism of its consumers."""

    cleanup: str = "delete"
    """``delete``, ``compact`` or ``compact,delete``."""

    retention_ms: int = FOREVER
    """How long records are kept (-1: forever, the event-sourcing default)."""

    doc: str = ""
    """What the topic is for."""

    broker_time: bool = False
    """Stamp records with the broker's append time, not the producer's: deadlines judged
    on this topic's records use a clock the producing node cannot set."""

    max_message_bytes: int | None = None
    """The broker's record size limit for this topic, when not its default (1 MiB)."""

    extra: tuple[tuple[str, str], ...] = ()
    """Further topic-level broker settings."""

    hashed_partitions: bool = False
    """Every producer picks the partition itself with ``partition_for(key)``, so a
    reader of one key can read one known partition (``tasks.assignments``), and the
    task-keyed topics, all of ``TASK_PARTITIONS``, are co-partitioned: a verifier shard
    reads the same partitions of each (``streams.leases``)."""

    inbox: bool = False
    """Each record is also written to the inbox topic of the node its key names
    (``inbox_spec``), in the same transaction: the one topic that node may read
    (``tasks.assignments``). The same bytes, but for the fields its node must not read
    (``node_view``)."""

    @property
    def max_record_bytes(self) -> int:
        """The largest record the topic takes: its ``max.message.bytes``."""
        return self.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES

    def name(self, prefix: str) -> str:
        """The full topic name under a network prefix."""
        return prefix + self.suffix

    def partition_of(self, key: str) -> int | None:
        """The partition a record keyed ``key`` must go to, or None (the client's choice)."""
        return partition_for(key, self.partitions) if self.hashed_partitions else None

    def config(self, min_insync_replicas: int) -> dict[str, str]:
        """Topic-level broker configuration."""
        return {
            "cleanup.policy": self.cleanup,
            "retention.ms": str(self.retention_ms),
            "min.insync.replicas": str(min_insync_replicas),
            # Keyed ordering relies on the producer's idempotence; never let an
            # out-of-sync replica become leader and drop acknowledged events.
            "unclean.leader.election.enable": "false",
            "message.timestamp.type": "LogAppendTime" if self.broker_time else "CreateTime",
            **({"max.message.bytes": str(self.max_message_bytes)}
               if self.max_message_bytes else {}),
            **dict(self.extra),
        }


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("nodes.registry", "node_id", ("NodeRegistered",), 6, cleanup="compact",
              doc="latest registration (keys, capability, stake) per node"),
    TopicSpec("nodes.heartbeats", "node_id", ("NodeHeartbeat",), 6, cleanup="compact,delete",
              retention_ms=DAY_MS, doc="liveness and load; only the latest matters"),
    TopicSpec("tasks.submitted", "task_id", ("TaskSubmitted",), 6, hashed_partitions=True,
              broker_time=True,
              doc="every submission, the start of a task's life; broker time, by which the "
                  "ledger refuses a stale or replayed one"),
    TopicSpec("tasks.assignments", "node_id", ("TaskAssigned", "DataKeyGranted", "RevealOpened",
                                                "CheckpointRequested"),
              12, hashed_partitions=True, inbox=True,
              doc="work, data-key grants, reveal calls and a dispute's checkpoint requests, "
                  "keyed by node: read by the "
                  "services, the audit and the submitters' watch; each record is also "
                  "written to its node's inbox (inbox_spec), the only copy a node may read"),
    TopicSpec("tasks.reissues", "task_id", ("ReissueRequested",), 6, hashed_partitions=True,
              doc="the verifier asks the allocator to place a lost replica again"),
    TopicSpec("results.commits", "task_id", ("ResultCommitted", "DataKeyRefused"), 6,
              hashed_partitions=True, broker_time=True,
              doc="signed commitments H(salt, digest), the commit phase; and a node's proven "
                  "refusal of a data key that misses the submitter's commitment"),
    TopicSpec("results.reveals", "task_id", ("ResultRevealed", "CheckpointProvided"), 6,
              hashed_partitions=True, broker_time=True,
              doc="salts, digests and checkpoint leaves, the reveal phase; and the exact "
                  "checkpoint states nodes give the verifier for a dispute's referee"),
    TopicSpec("tasks.verdicts", "task_id", ("TaskVerified", "TaskFailed"), 6,
              hashed_partitions=True,
              doc="Proof-of-Sync outcomes"),
    TopicSpec("nodes.penalties", "node_id", ("NodePenalized",), 3, broker_time=True,
              doc="judgements against dissenting or absent nodes; broker time, by which the "
                  "ledger refuses a replayed one"),
    TopicSpec("ledger.mints", "account", ("TokensMinted",), 3, broker_time=True,
              doc="faucet and governance mints: inputs of the ledger processor; broker "
                  "time, by which it refuses a replayed one"),
    TopicSpec("accounts.registry", "account_id", ("AccountRegistered",), 3,
              doc="signed account registrations binding an account id to its keys: inputs "
                  "of the ledger, which credits no account before it is registered; kept "
                  "for ever, not compacted, so the first binding of an id is never lost"),
    TopicSpec("accounts.ops", "account", ("AccountOperation",), 3, broker_time=True,
              doc="accounts' signed transfers, stakes, unstakes and withdrawals: inputs of "
                  "the ledger; broker time, from which an unstake's unbonding period counts; "
                  "kept for ever (a rebuild recalls the nonces of refused operations)"),
    TopicSpec("ledger.entries", "account", ("LedgerEntryPosted",), 6,
              doc="money movements the ledger processor decided; the Postgres ledger folds them"),
    TopicSpec("market.prices", "tier", ("PriceUpdated",), 1,
              doc="every price per compute unit the price engine set, per tier, kept for "
                  "ever (not compacted): the ledger judges a quote by the prices in force "
                  "over its validity, on replay too"),
    TopicSpec("governance", "proposal_id", ("ProposalSubmitted", "VoteCast",
                                            "ProposalDecided"), 3, broker_time=True,
              doc="proposals, secret ballots and the decided tallies; broker time, by "
                  "which a ballot after its proposal's close is refused"),
    TopicSpec("governance.params", "parameter", ("ParameterChanged",), 1,
              doc="every live-parameter change a passed proposal made (streams.params), "
                  "kept for ever: every processor follows them, on replay too"),
    TopicSpec("deadletter", "source_topic", ("DeadLettered",), 3,
              doc="records that failed to decode or validate, with the reason and original bytes"),
    TopicSpec("processors.leases", "unit", (), 3,
              doc="never written: its partitions are the processors' units of work (0 the "
                  "allocator, 1.. the verifier's task shards), leased to the live workers by "
                  "their consumer group (streams.leases)"),
    TopicSpec("processors.state", "processor", (), 1, cleanup="compact",
              max_message_bytes=65 * 1024 * 1024,
              # Written every batch: small segments, so compaction keeps it to the latest
              # record per key instead of an ever-growing active segment.
              extra=(("segment.bytes", str(64 * 1024 * 1024)), ("segment.ms", "600000"),
                     ("min.cleanable.dirty.ratio", "0.1")),
              doc="each service's latest state snapshot, signed, written in the same "
                  "transaction as its outputs and input positions (streams.kafka_runner)"),
    TopicSpec("processors.journal", "processor", (), 6, hashed_partitions=True,
              retention_ms=JOURNAL_RETENTION_MS, broker_time=True,
              max_message_bytes=16 * 1024 * 1024,
              extra=(("segment.ms", "600000"),),
              doc="what each batch added to a service's expiring logs (accepted event ids, "
                  "closed tasks: streams.journal), signed, in the batch's transaction; read "
                  "back over the logs' horizon on a restart, kept for JOURNAL_RETENTION_MS"),
)

INBOX_PREFIX = "inbox."
"""A node's inbox topic is ``<network prefix>inbox.<node id>``."""
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def inbox_spec(node_id: str) -> TopicSpec:
    """The inbox topic of one node: a copy of its records of ``tasks.assignments``
    (assignments, data-key grants, reveal calls), one partition, the only one of them
    its principal may read (Kafka's ACLs are per topic). Made when the node's credentials
    are issued (``streams.admin.ensure_inbox``); the record size limit of
    ``tasks.assignments``, but kept ``INBOX_RETENTION_MS``, not for ever: it is a
    delivery copy (the source of truth stays ``tasks.assignments``), and what it holds
    is stale long before (a reveal deadline is minutes away)."""
    source = _ASSIGNMENTS
    return TopicSpec(INBOX_PREFIX + node_id, source.key, source.events, 1,
                     cleanup=source.cleanup, retention_ms=INBOX_RETENTION_MS,
                     max_message_bytes=source.max_message_bytes, extra=source.extra,
                     doc=f"node {node_id}'s copy of its records of {source.suffix}")


def inbox_topic(prefix: str, node_id: str) -> str | None:
    """The full name of a node's inbox topic, or None when the node id cannot be part of
    a Kafka topic name (such a node has no inbox)."""
    name = prefix + INBOX_PREFIX + node_id
    return name if _TOPIC_NAME.fullmatch(name) else None


def partition_for(key: str, partitions: int) -> int:
    """The partition a keyed record goes to when its producer chooses explicitly.

    Used for ``tasks.assignments``: the allocator and the verifier write each
    node's events to this partition, and the node reads only it. A stable hash
    (the first 4 bytes of SHA-256), so every client, in any language, agrees.
    """
    if partitions < 1:
        raise ValueError(f"partitions {partitions} must be positive")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % partitions


TASK_PARTITIONS = 6
"""Partitions of every task-keyed topic: the same count and hash (``partition_for``)."""
TASK_TOPICS = tuple(t for t in TOPICS if t.key == "task_id")
assert all(t.partitions == TASK_PARTITIONS and t.hashed_partitions for t in TASK_TOPICS)
LEASES = next(t for t in TOPICS if t.suffix == "processors.leases")
DEAD_LETTER = next(t for t in TOPICS if t.suffix == "deadletter")
STATE = next(t for t in TOPICS if t.suffix == "processors.state")
JOURNAL = next(t for t in TOPICS if t.suffix == "processors.journal")
_ASSIGNMENTS = next(t for t in TOPICS if t.inbox)


_BY_EVENT = {event: spec for spec in TOPICS for event in spec.events}

NODE_HIDDEN: dict[str, dict[str, Any]] = {"TaskAssigned": {"replicas": 0, "quorum": 0}}
"""Fields of an inbox record that its node must not read, and what its copy carries
instead. An adaptive task's plan (``allocator.trust``): a node told it runs alone would
cheat exactly when no spot check can see it."""


def node_view(event: Event) -> Event:
    """The event as its node may see it (``NODE_HIDDEN``); the event itself when nothing
    is hidden. A changed copy has no signature: its sender signs it anew."""
    hidden = NODE_HIDDEN.get(event.name)
    if hidden is None or all(event.fields.get(k) == v for k, v in hidden.items()):
        return event
    return event.replace(**hidden).with_envelope(signature=None, signer=None)


def topic_for(event_name: str) -> TopicSpec:
    """The topic an event type is written to (a dict lookup: it is on the produce path)."""
    try:
        return _BY_EVENT[event_name]
    except KeyError:
        raise KeyError(f"no topic carries {event_name}") from None
