"""Fixtures: a real Kafka broker and a real Postgres, started once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from destra.network import LocalNetwork
from destra.settings import Settings
from streams import security
from streams.security import KafkaAccess
from tests.support import free_port_block, network_settings, running_network

# Unit tests build clients they never connect; the kafka fixture switches this process to
# the session broker's super user, and every network's processes run as their own.
security.use(KafkaAccess.plaintext())


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The machine-wide cache (Kafka jars), shared with `destra infra up`."""
    return Settings.from_env().cache_dir


@pytest.fixture(scope="session")
def kafka_libs(cache_dir: Path) -> Path:
    """The Kafka jars, fetched by Maven on first use."""
    from infra.kafka import ensure_jars

    return ensure_jars(cache_dir)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory, kafka_libs: Path) -> Iterator[str]:
    """A single-broker KRaft Kafka for the session, secured as `destra infra up` starts
    it (TLS, SASL/SCRAM, ACLs); yields its bootstrap servers. This process is its super
    user (``kafka_access``)."""
    from infra.kafka import KafkaCluster, new_security
    from infra.quotas import set_quotas

    if os.environ.get("DESTRA_TEST_KAFKA_BOOTSTRAP"):
        # An external broker: DESTRA_KAFKA_CREDENTIALS (a super user's), or
        # DESTRA_KAFKA_INSECURE=1 for a plaintext one.
        named = security.credentials_from_env()
        security.use(named if named is not None else KafkaAccess.plaintext())
        yield os.environ["DESTRA_TEST_KAFKA_BOOTSTRAP"]
        return
    base = tmp_path_factory.mktemp("kafka")
    cluster = KafkaCluster(base, kafka_libs, brokers=1, port=free_port_block(1),
                           security=new_security(base / "tls"))
    cluster.start()
    security.use(cluster.access)
    # As `destra infra up` sets them (infra.quotas): the default quota for every principal,
    # the super user exempt. The networks' services made per test run at the default,
    # which no test comes near; the adversary suite floods past it.
    set_quotas(kafka_libs, cluster.bootstrap, cluster.access, users=[security.ADMIN])
    try:
        yield cluster.bootstrap
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real embedded PostgreSQL for the session; yields its DSN."""
    from infra.postgres import start_embedded, stop_embedded

    if os.environ.get("DESTRA_TEST_PG_DSN"):
        yield os.environ["DESTRA_TEST_PG_DSN"]
        return
    data_dir = tmp_path_factory.mktemp("pg") / "data"
    handle = start_embedded(data_dir)
    try:
        yield handle.dsn
    finally:
        stop_embedded(data_dir, handle.system_user)


@pytest.fixture
def network(kafka: str, request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for a fresh network on the session broker: its own topic prefix, and its
    own genesis and service keys in a temporary directory (``tests.support.service_signed``
    signs as its services)."""
    return network_settings(kafka, request.node.name[:60], tmp_path_factory.mktemp("genesis"))


@pytest.fixture
def three_operators(network: Settings, kafka: str, pg_dsn: str,
                    tmp_path: Path) -> Iterator[LocalNetwork]:
    """A network whose services are not started yet: alice and operators op-a, op-b and
    op-c funded, 20 s commit and 10 s reveal windows."""
    with running_network(network.with_(home=tmp_path / "home"), kafka, pg_dsn, tmp_path, {
            "DESTRA_COMMIT_WINDOW_MS": "20000", "DESTRA_REVEAL_WINDOW_MS": "10000"}) as net:
        net.mint("alice", "op-a", "op-b", "op-c")
        yield net
