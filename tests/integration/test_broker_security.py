"""The broker itself keeps everyone where they belong: no client without credentials,
and a principal writes and reads only the topics its ACLs name (``streams.security``).

On the session broker, secured as `destra infra up` starts it. Each case is a real
client with its own principal, straight to the broker; the error asserted is the one
the broker sends back.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from destra import keystore
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from schemas import encode
from schemas.samples import sample_event
from streams import security
from streams.admin import live_broker_count
from streams.klog import KAFKA_LOG
from streams.security import KafkaAccess, client_config
from streams.topics import inbox_topic, topic_for
from tests.support import service_signed

pytestmark = pytest.mark.integration


@pytest.fixture
def net(network: Settings, kafka: str, pg_dsn: str, tmp_path: Path) -> LocalNetwork:
    """A network whose principals exist (services, node ``n1``, account ``alice``), with
    no process started: the clients below are the attackers."""
    if not security.current().secure:
        pytest.skip("the session broker is plaintext (DESTRA_KAFKA_INSECURE)")
    local = LocalNetwork(network.with_(home=tmp_path / "home"), kafka, create_database(pg_dsn),
                         tmp_path / "logs")
    local.join_node("n1")
    local.create_accounts("alice")
    return local


def _produce(net: LocalNetwork, access: KafkaAccess, event_name: str) -> KafkaError | None:
    """Write one well-formed ``event_name`` to its topic as ``access``; the delivery error."""
    event = service_signed(net.settings, sample_event(event_name))
    producer = Producer({**client_config(net.bootstrap, access), "acks": "all",
                         "message.timeout.ms": 10_000})
    errors: list[KafkaError | None] = []
    spec = topic_for(event_name)
    producer.produce(spec.name(net.settings.topic_prefix), encode(event),
                     key=str(event.fields.get(spec.key, "k")).encode(),  # compacted topics
                     on_delivery=lambda err, msg: errors.append(err))
    producer.flush(15)
    assert len(errors) == 1
    return errors[0]


def test_a_client_without_credentials_is_refused(kafka: str) -> None:
    admin = security.current()
    if not admin.secure:
        pytest.skip("the session broker is plaintext (DESTRA_KAFKA_INSECURE)")
    # Plaintext to the TLS listener: no metadata, no broker.
    assert live_broker_count(kafka, 3.0, KafkaAccess.plaintext()) == 0
    # TLS with a wrong password: the broker says the authentication failed.
    wrong = KafkaAccess.scram(security.ADMIN, "not-the-password", admin.ca_pem)
    errors: list[KafkaError] = []
    producer = Producer({**client_config(kafka, wrong), "logger": KAFKA_LOG,
                         "error_cb": errors.append})
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        producer.poll(0.1)
    assert errors and errors[0].code() == KafkaError._AUTHENTICATION, errors
    assert "invalid credentials" in errors[0].str()


def test_a_node_cannot_mint_or_judge_and_reads_only_its_inbox(net: LocalNetwork) -> None:
    node = KafkaAccess.load(keystore.node_credentials(net.settings, "n1"))
    assert node.username == security.node_principal(net.settings.topic_prefix, "n1")

    # What a node may write goes through.
    assert _produce(net, node, "NodeHeartbeat") is None
    # A mint and a verdict, even well-formed and signed, are refused by the broker.
    for name in ("TokensMinted", "TaskVerified", "LedgerEntryPosted", "TaskAssigned"):
        err = _produce(net, node, name)
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, name

    # Reading a topic it has no ACL for: refused.
    prefix = net.settings.topic_prefix
    consumer = Consumer({**client_config(net.bootstrap, node), "group.id": f"{prefix}node-n1",
                         "enable.auto.commit": False})
    try:
        entries = TopicPartition(topic_for("LedgerEntryPosted").name(prefix), 0)
        described = consumer.list_topics(entries.topic, timeout=10).topics[entries.topic]
        assert described.error is not None
        assert described.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
        # Subscribed, the consumer is told so.
        consumer.subscribe([entries.topic])
        error = None
        deadline = time.monotonic() + 15
        while error is None and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            error = msg.error() if msg is not None else None
        assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    finally:
        consumer.close()
    # Its own inbox it may read; the assignments topic, every node's work, it may not.
    consumer = Consumer({**client_config(net.bootstrap, node), "group.id": f"{prefix}node-n1",
                         "enable.auto.commit": False})
    inbox = inbox_topic(prefix, "n1")
    assert inbox is not None
    try:
        assert consumer.list_topics(inbox, timeout=10).topics[inbox].error is None
        shared = topic_for("TaskAssigned").name(prefix)
        described = consumer.list_topics(shared, timeout=10).topics[shared]
        assert described.error is not None
        assert described.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    finally:
        consumer.close()
    # Nor may it use another node's consumer group, even on its own inbox.
    other = Consumer({**client_config(net.bootstrap, node), "group.id": f"{prefix}node-n2",
                      "enable.auto.commit": False})
    try:
        other.subscribe([inbox])
        error = None
        deadline = time.monotonic() + 15
        while error is None and time.monotonic() < deadline:
            msg = other.poll(0.2)
            error = msg.error() if msg is not None else None
        assert error is not None and error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED
    finally:
        other.close()


def test_only_the_treasury_mints_and_a_submitter_only_submits_and_grants(
        net: LocalNetwork) -> None:
    alice = KafkaAccess.load(keystore.account_credentials(net.settings, "alice"))
    assert _produce(net, alice, "TaskSubmitted") is None
    for name in ("TokensMinted", "TaskVerified", "NodeRegistered", "ResultCommitted"):
        err = _produce(net, alice, name)
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, name
    for role in ("processors", "ledger", "projector"):
        err = _produce(net, net.credentials(role), "TokensMinted")
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, role
    assert _produce(net, net.credentials("treasury"), "TokensMinted") is None
