"""Kafka administration: liveness, idempotent topic creation, descriptions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from destra.errors import InfraError
from streams.klog import KAFKA_LOG
from streams.security import KafkaAccess, client_config
from streams.topics import INBOX_PREFIX, TOPICS, TopicSpec, inbox_spec, inbox_topic


def admin_client(bootstrap: str, access: KafkaAccess | None = None) -> AdminClient:
    # Connection refusals while a broker starts are expected: logged, not printed.
    config: dict[str, Any] = {**client_config(bootstrap, access), "logger": KAFKA_LOG}
    return AdminClient(config)


def live_broker_count(bootstrap: str, timeout_s: float = 2.0,
                      access: KafkaAccess | None = None) -> int:
    """How many brokers the cluster reports in its metadata; 0 if it does not answer."""
    try:
        metadata = admin_client(bootstrap, access).list_topics(timeout=timeout_s)
    except KafkaException:
        return 0
    return len(metadata.brokers)


@dataclass(frozen=True)
class TopicState:
    """What the broker says about one topic."""

    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


def ensure_topics(
    bootstrap: str,
    prefix: str,
    *,
    replication_factor: int,
    min_insync_replicas: int,
    specs: Iterable[TopicSpec] = TOPICS,
    timeout_s: float = 30.0,
    access: KafkaAccess | None = None,
) -> list[str]:
    """Create the missing topics of the catalogue; returns the names created.

    Idempotent. Topics that already exist keep their partitions and get the
    catalogue's topic settings, so a network made by an older version is
    upgraded in place (for example, a topic that now stamps broker time).
    """
    admin = admin_client(bootstrap, access)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    _reconcile(admin, [s for s in specs if s.name(prefix) in existing], prefix,
               min_insync_replicas, timeout_s)
    new = [
        NewTopic(spec.name(prefix), num_partitions=spec.partitions,
                 replication_factor=replication_factor,
                 config=spec.config(min_insync_replicas))
        for spec in specs
        if spec.name(prefix) not in existing
    ]
    if not new:
        return []
    created = []
    for name, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise InfraError(f"could not create topic {name}: {e.args[0].str()}") from e
    return created


def ensure_inbox(
    bootstrap: str,
    prefix: str,
    node_id: str,
    *,
    replication_factor: int,
    min_insync_replicas: int,
    timeout_s: float = 30.0,
    access: KafkaAccess | None = None,
) -> bool:
    """Create node ``node_id``'s inbox topic (``streams.topics.inbox_spec``) if missing;
    whether it was created. Idempotent, like ``ensure_topics``. Made before the node can
    register, so the services never write to an inbox that is not there yet; a node id
    that cannot name a topic is an ``InfraError``."""
    if inbox_topic(prefix, node_id) is None:
        raise InfraError(f"node id {node_id!r} cannot name an inbox topic "
                         f"({prefix}{INBOX_PREFIX}<id>: letters, digits, '.', '_', '-', "
                         "at most 249 characters in all)")
    return bool(ensure_topics(bootstrap, prefix, replication_factor=replication_factor,
                              min_insync_replicas=min_insync_replicas,
                              specs=[inbox_spec(node_id)], timeout_s=timeout_s, access=access))


def _reconcile(admin: AdminClient, specs: list[TopicSpec], prefix: str,
               min_insync_replicas: int, timeout_s: float) -> None:
    """Set the catalogue's settings on topics that exist (an incremental SET of each)."""
    from confluent_kafka.admin import (
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        ResourceType,
    )

    if not specs:
        return
    resources = [ConfigResource(ResourceType.TOPIC, spec.name(prefix), incremental_configs=[
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
        for k, v in spec.config(min_insync_replicas).items()]) for spec in specs]
    for resource, future in admin.incremental_alter_configs(resources).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as e:
            raise InfraError(f"could not update the settings of topic {resource.name}: "
                             f"{e.args[0].str()}") from e


def describe_topics(bootstrap: str, prefix: str, timeout_s: float = 10.0) -> list[TopicState]:
    """Partitions, replication and configuration of the network's topics."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    admin = admin_client(bootstrap)
    metadata = admin.list_topics(timeout=timeout_s)
    names = sorted(n for n in metadata.topics if n.startswith(prefix))
    resources = [ConfigResource(ResourceType.TOPIC, n) for n in names]
    configs = admin.describe_configs(resources) if resources else {}
    states = []
    for resource, future in configs.items():
        topic = metadata.topics[resource.name]
        entries = future.result(timeout=timeout_s)
        wanted = ("cleanup.policy", "retention.ms", "min.insync.replicas",
                  "message.timestamp.type")
        states.append(TopicState(
            name=resource.name,
            partitions=len(topic.partitions),
            replication_factor=len(next(iter(topic.partitions.values())).replicas),
            config={k: entries[k].value for k in wanted if k in entries},
        ))
    return sorted(states, key=lambda s: s.name)


def delete_topics(bootstrap: str, names: list[str], timeout_s: float = 30.0,
                  access: KafkaAccess | None = None) -> None:
    """Delete topics (used by benchmarks to clean up after themselves)."""
    if not names:
        return
    admin = admin_client(bootstrap, access)  # must outlive the futures it resolves
    for future in admin.delete_topics(names, operation_timeout=timeout_s).values():
        future.result(timeout=timeout_s)
