"""Helpers shared by the tests."""

from __future__ import annotations

import hashlib
import random
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from destra.crypto import KeyPair, sign_event
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from schemas import Event, new_event
from streams.authority import AUTHORITY, Genesis, ServiceSigner, load_signer

TEARDOWN_GRACE_S = 5.0
"""How long a test's network gets to stop on SIGTERM before SIGKILL. Its checks are done:
a node draining for a reveal call that will never come (its replica was dropped, or the
task decided without it) would otherwise hold the suite for the node's 30 s grace."""


@contextmanager
def running_network(settings: Settings, kafka: str, pg_dsn: str, workdir: Path,
                  env: Mapping[str, str]) -> Iterator[LocalNetwork]:
    """A test's network on the session broker, in a database of its own, with ``env`` for
    every process; stopped with ``TEARDOWN_GRACE_S`` at the end."""
    net = LocalNetwork(settings, kafka, create_database(pg_dsn), workdir / "logs",
                       env_extra=env)
    try:
        yield net
    finally:
        net.stop(timeout_s=TEARDOWN_GRACE_S)


def network_settings(kafka: str, producer_id: str, keys: Path) -> Settings:
    """Settings for a fresh network on the session broker: its own topic prefix (its topics
    made), and its own genesis and service keys under ``keys`` (``service_signed`` signs
    as its services); on a secure broker, the operator's credentials and the services'
    principals as ``destra infra up`` leaves them."""
    from governance.keys import ensure_tally_key
    from streams import security
    from streams.admin import ensure_topics
    from streams.authority import ensure_genesis

    prefix = f"t{random.randint(0, 1 << 30):x}."
    settings = Settings(kafka_bootstrap=kafka, topic_prefix=prefix, producer_id=producer_id,
                        genesis_file=keys / "genesis.json", service_key_dir=keys / "services")
    ensure_genesis(settings.genesis_path, settings.service_keys)
    ensure_tally_key(settings.genesis_path, settings.service_keys)
    ensure_topics(kafka, prefix, replication_factor=1, min_insync_replicas=1)
    admin = security.current()
    if admin.secure:
        admin.save(security.service_credentials(settings.service_keys, security.ADMIN))
        security.setup_network(kafka, prefix, settings.service_keys, admin.ca_pem, admin)
    else:
        settings = settings.with_(kafka_insecure=True)
    return settings


def free_port_block(count: int, *, spread: int = 100) -> int:
    """A base port p such that p..p+count-1 and p+spread..p+spread+count-1 are all free."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        ports = [base + i for i in range(count)] + [base + spread + i for i in range(count)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


def eventually(check: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> None:
    """Wait until ``check()`` is true, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        time.sleep(interval)


Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    """Every sample of a service's ``/metrics``: (name, labels, value)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 - ours
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(body) for s in family.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, ls, v in samples
               if n == name and all(ls.get(k) == want for k, want in labels.items()))


def account_keys(name: str) -> KeyPair:
    """Deterministic keys for a test account or node (never use such keys for real)."""
    return KeyPair(hashlib.sha256(f"{name} signing".encode()).digest(),
                   hashlib.sha256(f"{name} x25519".encode()).digest())


def signed_submission(event: Event) -> Event:
    """A TaskSubmitted signed by its submitter's test keys, carrying their signing key."""
    keys = account_keys(event.fields["submitter_id"])
    return sign_event(event.replace(signing_key=keys.signing_public), keys,
                      event.fields["submitter_id"])


def registration(name: str, keys: KeyPair | None = None) -> Event:
    """The signed ``AccountRegistered`` of a test account (its ``account_keys`` by default)."""
    keys = keys or account_keys(name)
    return sign_event(new_event("AccountRegistered", name, account_id=name,
                                signing_key=keys.signing_public,
                                encryption_key=keys.encryption_public), keys, name)


def service_signer(settings: Settings, role: str) -> ServiceSigner:
    """The signer of a service role of the network ``settings`` names (its genesis)."""
    return load_signer(settings.service_keys, role, Genesis.load(settings.genesis_path))


def service_signed(settings: Settings, event: Event) -> Event:
    """An authority event signed by the first role allowed to emit it; others unchanged."""
    roles = AUTHORITY.get(event.name)
    return event if roles is None else service_signer(settings, roles[0]).sign(event)


def genesis_env(settings: Settings) -> dict[str, str]:
    """The variables that give a spawned process the network's genesis and service keys."""
    return {"DESTRA_GENESIS": str(settings.genesis_path),
            "DESTRA_SERVICE_KEYS": str(settings.service_keys)}


def network_balances(net: LocalNetwork, schema: str | None = None) -> dict[str, int]:
    """Every balance of a live network's ledger, projected into Postgres now (in its own
    schema, fresh unless named) and checked to sum to zero."""
    from ledger.projection import LedgerProjection
    from ledger.service import project_to_now

    projection = LedgerProjection(net.pg_dsn, schema or f"bal{random.randrange(1 << 30):x}")
    try:
        project_to_now(net.settings, net.bootstrap, projection)
        projection.check()
        return dict(projection.balances())
    finally:
        projection.close()


@dataclass
class Record:
    """A consumed Kafka record as ``confluent_kafka.Message`` shows it, for unit tests of the
    runners and the rebuilds: its value, topic, offset, key and timestamp
    (``timestamp_type`` 1: the producer's time, 2: the broker's append time)."""

    _value: bytes
    _offset: int
    _topic: str
    at_ms: int
    _key: bytes | None = None
    timestamp_type: int = 1

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return (self.timestamp_type, self.at_ms)

    def error(self) -> None:
        return None


def start_with_nodes(net: LocalNetwork, nodes: list[str]) -> None:
    """Start the network's services and one node per name, each its own operator
    (``op-<name>``), and wait until every node is registered."""
    net.start_services()
    for n in nodes:
        net.start_node(n, operator=f"op-{n}")
    net.wait_registered(nodes)
