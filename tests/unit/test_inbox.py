"""A node's inbox: which topics a record goes to, the fallback for a node without one,
and the ACLs that make it the only copy a node may read."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka.admin import AclOperation, ResourcePatternType, ResourceType

from destra.errors import DeliveryFailed
from destra.settings import Settings
from schemas import encode
from schemas.samples import sample_event, with_fields
from streams import security
from streams.producer import EventProducer, Inboxes
from streams.topics import (
    INBOX_PREFIX,
    INBOX_RETENTION_MS,
    TOPICS,
    inbox_spec,
    inbox_topic,
    partition_for,
    topic_for,
)

PREFIX = "t1."
ASSIGNMENTS = topic_for("TaskAssigned")


class Broker:
    """What the fake broker holds: which topics exist, and what was asked of it."""

    def __init__(self, *existing: str) -> None:
        self.existing = set(existing)
        self.lookups: list[str] = []
        self.down = False

    def lookup(self, topic: str) -> bool:
        self.lookups.append(topic)
        if self.down:
            raise DeliveryFailed(f"could not look up inbox topic {topic}: timed out")
        return topic in self.existing


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeKafka:
    """Records what is produced, where."""

    def __init__(self) -> None:
        self.produced: list[dict[str, Any]] = []

    def produce(self, topic: str, **kw: Any) -> None:
        self.produced.append({"topic": topic, **kw})

    def poll(self, timeout: float) -> int:
        return 0


def producer(broker: Broker, clock: Clock | None = None) -> tuple[EventProducer, FakeKafka]:
    p = EventProducer(Settings(topic_prefix=PREFIX), "localhost:1",
                      inboxes=Inboxes(broker.lookup, clock=clock or Clock()))
    kafka = FakeKafka()
    p._producer = kafka  # type: ignore[assignment]
    return p, kafka


def assigned(node: str, name: str = "TaskAssigned") -> Any:
    return with_fields(sample_event(name), node_id=node)


@pytest.mark.parametrize("name", ["TaskAssigned", "DataKeyGranted", "RevealOpened"])
def test_a_record_for_a_node_goes_to_its_inbox_and_the_assignments_topic(name: str) -> None:
    inbox = PREFIX + INBOX_PREFIX + "n1"
    p, kafka = producer(Broker(inbox))
    event = p.send(assigned("n1", name))
    shared = ASSIGNMENTS.name(PREFIX)
    assert [(r["topic"], r.get("partition")) for r in kafka.produced] == [
        (inbox, 0), (shared, partition_for("n1", ASSIGNMENTS.partitions))]
    # The same signed bytes and key on both: the node checks what the services read.
    assert {r["value"] for r in kafka.produced} == {encode(event)}
    assert {r["key"] for r in kafka.produced} == {b"n1"}


def test_other_records_go_to_their_topic_only_and_look_nothing_up() -> None:
    broker = Broker()
    p, _ = producer(broker)
    for name in ("ResultCommitted", "TaskSubmitted", "NodeHeartbeat", "TaskVerified"):
        event = sample_event(name)
        assert p.destinations(event) == [
            (topic_for(name).name(PREFIX),
             topic_for(name).partition_of(str(event.fields[topic_for(name).key])))]
    assert broker.lookups == []


def test_a_node_without_an_inbox_gets_the_assignments_topic_only_and_is_looked_up_again(
        caplog: pytest.LogCaptureFixture) -> None:
    broker, clock = Broker(), Clock()
    p, kafka = producer(broker, clock)
    shared = (ASSIGNMENTS.name(PREFIX), partition_for("old", ASSIGNMENTS.partitions))
    assert p.destinations(assigned("old")) == [shared]
    assert "no inbox topic t1.inbox.old" in caplog.text
    # Not looked up again on every record: the batch's latency stays as it was.
    for _ in range(3):
        p.send(assigned("old"))
    assert broker.lookups == ["t1.inbox.old"]
    assert [r["topic"] for r in kafka.produced] == [shared[0]] * 3
    # Its inbox made (`destra node join` again): found at the next look-up, then cached.
    broker.existing.add("t1.inbox.old")
    clock.now += p.inboxes.recheck_s + 0.1
    assert p.destinations(assigned("old")) == [("t1.inbox.old", 0), shared]
    clock.now += 3600
    p.destinations(assigned("old"))
    assert broker.lookups == ["t1.inbox.old"] * 2


def test_a_broker_that_does_not_answer_fails_the_send_rather_than_skip_the_inbox() -> None:
    broker = Broker("t1.inbox.n1")
    broker.down = True
    p, kafka = producer(broker)
    with pytest.raises(DeliveryFailed):
        p.send(assigned("n1"))
    assert kafka.produced == []
    broker.down = False
    p.send(assigned("n1"))
    assert [r["topic"] for r in kafka.produced][0] == "t1.inbox.n1"


def test_a_node_id_that_cannot_name_a_topic_has_no_inbox() -> None:
    broker = Broker()
    p, _ = producer(broker)
    for node in ("n 1", "nœud", "x" * 250, "a/b"):
        assert inbox_topic(PREFIX, node) is None
        assert p.destinations(assigned(node)) == [
            (ASSIGNMENTS.name(PREFIX), partition_for(node, ASSIGNMENTS.partitions))]
    assert broker.lookups == []
    assert inbox_topic(PREFIX, "gpu-7.eu_west") == "t1.inbox.gpu-7.eu_west"


def test_an_inbox_keeps_what_the_assignments_topic_keeps_in_one_partition() -> None:
    spec = inbox_spec("n1")
    assert spec.name(PREFIX) == "t1.inbox.n1" and spec.partitions == 1
    # The assignments' settings, but a delivery copy is kept a week, not for ever.
    assert spec.config(2) == {**ASSIGNMENTS.config(2), "retention.ms": str(INBOX_RETENTION_MS)}
    assert spec.max_record_bytes == ASSIGNMENTS.max_record_bytes
    assert not spec.inbox and spec.partition_of("n1") is None
    # Not a catalogue topic: one per node, made when the node joins.
    assert [t for t in TOPICS if t.inbox] == [ASSIGNMENTS]
    assert all(not t.suffix.startswith(INBOX_PREFIX) for t in TOPICS)


def _topic_grants(acls: list[Any], ops: set[AclOperation]) -> set[tuple[str, str]]:
    return {(b.name, b.resource_pattern_type.name) for b in acls
            if b.restype == ResourceType.TOPIC and b.operation in ops}


def test_a_node_reads_only_its_own_inbox() -> None:
    reads = _topic_grants(security.node_acls(PREFIX, "n1"), {AclOperation.READ})
    assert reads == {("t1.inbox.n1", "LITERAL")}
    describes = _topic_grants(security.node_acls(PREFIX, "n1"), {AclOperation.DESCRIBE})
    assert ASSIGNMENTS.name(PREFIX) not in {name for name, _ in describes}
    assert ("t1.inbox.", "PREFIXED") not in describes
    # What a node joined before inboxes could read, deleted when it joins again.
    assert _topic_grants(security.obsolete_node_acls(PREFIX, "n1"),
                         {AclOperation.READ}) == {(ASSIGNMENTS.name(PREFIX), "LITERAL")}


def test_the_processors_and_the_submitters_write_to_every_inbox() -> None:
    inbox_writes = {("t1.inbox.", ResourcePatternType.PREFIXED.name)}
    processors = [b for b in security.network_acls(PREFIX)
                  if b.principal == "User:" + security.principal(PREFIX, "processors")]
    assert inbox_writes <= _topic_grants(processors, {AclOperation.WRITE})
    assert inbox_writes <= _topic_grants(security.account_acls(PREFIX, "alice"),
                                         {AclOperation.WRITE})
    for role in ("ledger", "projector", "treasury"):
        acls = [b for b in security.network_acls(PREFIX)
                if b.principal == "User:" + security.principal(PREFIX, role)]
        assert not inbox_writes & _topic_grants(acls, {AclOperation.WRITE})
    # A node writes to no inbox, its own included.
    assert not any(name.startswith("t1.inbox.") for name, _ in _topic_grants(
        security.node_acls(PREFIX, "n1"), {AclOperation.WRITE}))
