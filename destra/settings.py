"""One frozen settings object, read from ``DESTRA_*`` variables and CLI flags."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from destra.errors import ConfigError


def _default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "destra"


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "destra"


@dataclass(frozen=True)
class Settings:
    """Where the services live and how clients reach them."""

    home: Path = field(default_factory=_default_home)
    """Data directories, logs and the state file of locally started services."""

    cache_dir: Path = field(default_factory=_default_cache)
    """Machine-wide cache: the Kafka jars fetched by Maven live here, once."""

    kafka_bootstrap: str | None = None
    """An external Kafka's bootstrap servers; when set, no local broker is started."""

    kafka_insecure: bool = False
    """Plaintext Kafka: no TLS, no authentication, no ACLs (``--insecure``,
    ``DESTRA_KAFKA_INSECURE=1``). Only for local debugging; the default is TLS with
    SASL/SCRAM and one principal per party (``streams.security``)."""

    kafka_advertise: tuple[str, ...] = ()
    """Addresses other machines reach the local broker at, ``HOST[:PORT]`` each
    (``destra infra up --advertise``, ``DESTRA_KAFKA_ADVERTISE`` as a comma list; ``none``
    clears a recorded choice). Empty: the choice ``infra up`` recorded last, if any."""

    kafka_port: int = 19092
    """First client port of the local broker(s); broker i listens on port + i."""

    kafka_brokers: int = 1
    """How many local combined broker+controller nodes to run (1 or 3)."""

    kafka_heap_mb: int = 384
    """JVM heap per local broker: the box is small and shared with Postgres."""

    pg_dsn: str | None = None
    """An external Postgres DSN; when set, no embedded Postgres is started.

    The embedded server listens only on a Unix socket in its data directory.
    """

    topic_prefix: str = "destra."
    """Prefix of every topic name, so several networks can share one cluster."""

    producer_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """Written into every event envelope this process produces."""

    blob_dir: Path | None = None
    """The content-addressed blob store shared by submitters and nodes; ``home/blobs``
    when unset. Every blob is a ciphertext, named by its SHA-256."""

    inline_max_bytes: int = 262_144
    """Largest ciphertext carried inside an event; bigger ones go to the blob store.
    A quarter of the broker's 1 MiB message limit, leaving room for the rest of a batch."""

    genesis_file: Path | None = None
    """The network's genesis file (its services' public keys); ``home/genesis.json``
    when unset. Every process that acts on the services' events needs it."""

    service_key_dir: Path | None = None
    """Where this operator keeps the services' private keys (``<role>.key``, 0600);
    ``home/services`` when unset. Only the operator running a service needs its key."""

    @property
    def genesis_path(self) -> Path:
        """The genesis file."""
        return self.genesis_file if self.genesis_file is not None else self.home / "genesis.json"

    @property
    def service_keys(self) -> Path:
        """The directory of the services' private keys."""
        return self.service_key_dir if self.service_key_dir is not None else self.home / "services"

    @property
    def blobs(self) -> Path:
        """The blob store's directory."""
        return self.blob_dir if self.blob_dir is not None else self.home / "blobs"

    @property
    def replication_factor(self) -> int:
        """Replicas per partition: 3 on a 3-broker cluster, else what exists."""
        return min(3, self.kafka_brokers)

    @property
    def min_insync_replicas(self) -> int:
        """With three replicas one broker may fail without losing acked writes."""
        return 2 if self.replication_factor >= 3 else 1

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (flags override the environment)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``DESTRA_*`` variables, then explicit overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        paths = {"DESTRA_HOME": "home", "DESTRA_CACHE_DIR": "cache_dir",
                 "DESTRA_BLOB_DIR": "blob_dir", "DESTRA_GENESIS": "genesis_file",
                 "DESTRA_SERVICE_KEYS": "service_key_dir"}
        strings = {
            "DESTRA_KAFKA_BOOTSTRAP": "kafka_bootstrap",
            "DESTRA_PG_DSN": "pg_dsn",
            "DESTRA_TOPIC_PREFIX": "topic_prefix",
            "DESTRA_PRODUCER_ID": "producer_id",
        }
        ints = {
            "DESTRA_KAFKA_PORT": "kafka_port",
            "DESTRA_KAFKA_BROKERS": "kafka_brokers",
            "DESTRA_KAFKA_HEAP_MB": "kafka_heap_mb",
            "DESTRA_INLINE_MAX_BYTES": "inline_max_bytes",
        }
        if env.get("DESTRA_KAFKA_INSECURE"):
            flag = env["DESTRA_KAFKA_INSECURE"].strip().lower()
            if flag not in ("0", "1", "true", "false", "yes", "no"):
                raise ConfigError(f"DESTRA_KAFKA_INSECURE must be 1 or 0, got {flag!r}")
            values["kafka_insecure"] = flag in ("1", "true", "yes")
        if env.get("DESTRA_KAFKA_ADVERTISE"):
            values["kafka_advertise"] = tuple(
                a.strip() for a in env["DESTRA_KAFKA_ADVERTISE"].split(",") if a.strip())
        for var, name in paths.items():
            if env.get(var):
                values[name] = Path(env[var]).expanduser()
        for var, name in strings.items():
            if env.get(var):
                values[name] = env[var]
        for var, name in ints.items():
            if env.get(var):
                try:
                    values[name] = int(env[var])
                except ValueError as e:
                    raise ConfigError(f"{var} must be an integer, got {env[var]!r}") from e
        settings = cls(**values).with_(**overrides)
        settings.check()
        return settings

    def check(self) -> None:
        """Reject settings that cannot work, with the reason."""
        if self.kafka_brokers not in (1, 3):
            raise ConfigError(f"kafka_brokers must be 1 or 3, got {self.kafka_brokers}")
        if not 1024 <= self.kafka_port <= 65000:
            raise ConfigError(f"kafka_port out of range: {self.kafka_port}")
        if self.kafka_heap_mb < 128:
            raise ConfigError(f"kafka_heap_mb too small: {self.kafka_heap_mb}")
        if not 0 <= self.inline_max_bytes <= 900_000:
            raise ConfigError(f"inline_max_bytes must be 0..900000 (under the broker's 1 MiB "
                              f"message limit), got {self.inline_max_bytes}")
