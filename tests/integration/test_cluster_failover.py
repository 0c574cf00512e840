"""A 3-broker cluster loses a broker: no acknowledged event is lost, consumers go on."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from destra.settings import Settings
from infra.kafka import KafkaCluster, new_security
from schemas.samples import sample_event, with_fields
from streams import security
from streams.admin import ensure_topics
from streams.consumer import EventConsumer
from streams.producer import EventProducer
from streams.security import client_config
from tests.support import free_port_block

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, kafka_libs: Path) -> Iterator[KafkaCluster]:
    """Three combined broker+controller nodes, replication 3, min.insync.replicas 2."""
    base = tmp_path_factory.mktemp("cluster")
    c = KafkaCluster(base, kafka_libs, brokers=3, port=free_port_block(3), heap_mb=256,
                     security=new_security(base / "tls"))
    c.start()
    before = security.current()
    security.use(c.access)  # this module's clients are the cluster's super user
    try:
        yield c
    finally:
        security.use(before)
        c.stop(grace_s=10)


def _leaders(bootstrap: str, topic: str) -> Counter[int]:
    metadata = AdminClient(client_config(bootstrap)).list_topics(topic, timeout=10)
    return Counter(p.leader for p in metadata.topics[topic].partitions.values())


def test_killing_a_broker_loses_no_acknowledged_event(cluster: KafkaCluster) -> None:
    settings = Settings(kafka_bootstrap=cluster.bootstrap, kafka_brokers=3, producer_id="failover")
    ensure_topics(cluster.bootstrap, settings.topic_prefix, replication_factor=3,
                  min_insync_replicas=2)
    template = sample_event("TaskSubmitted")
    topic = EventProducer(settings, cluster.bootstrap).topic_name(template)
    acked: list[str] = []

    def produce(producer: EventProducer, n: int) -> None:
        for _ in range(n):
            event = with_fields(template, task_id=f"task-{uuid.uuid4()}")
            producer.send(event, on_delivery=lambda err, msg, t=event.fields["task_id"]:
                          acked.append(t) if err is None else None)
        producer.flush()

    producer = EventProducer(settings, cluster.bootstrap)
    consumer = EventConsumer(settings, cluster.bootstrap, f"g-{uuid.uuid4()}", [topic])
    seen: list[str] = []

    # Before the failure: events flow and a consumer is reading.
    produce(producer, 600)
    while len(seen) < 300:
        d = consumer.poll(10)
        assert d is not None, "consumer stalled before the failure"
        seen.append(d.event.fields["task_id"])
        consumer.store(d)

    # Kill (SIGKILL) the broker that leads the most partitions of the topic.
    victim, _ = _leaders(cluster.bootstrap, topic).most_common(1)[0]
    cluster.kill(victim)

    # Keep producing through the failover; the idempotent producer retries.
    produce(producer, 600)
    assert len(acked) == 1200

    # The same consumer carries on and sees every acknowledged event.
    while set(acked) - set(seen):
        d = consumer.poll(30)
        assert d is not None, f"consumer stalled; {len(set(acked) - set(seen))} events unseen"
        seen.append(d.event.fields["task_id"])
        consumer.store(d)
    consumer.close()

    # The log holds each acknowledged event exactly once (no loss, no duplicate).
    with EventConsumer(settings, cluster.bootstrap, f"audit-{uuid.uuid4()}", [topic]) as audit:
        logged = Counter(d.event.fields["task_id"] for d in audit.stream(idle_timeout_s=5))
    assert set(logged) == set(acked)
    assert max(logged.values()) == 1
    assert cluster.replication_factor == 3
