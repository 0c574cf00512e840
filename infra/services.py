"""`destra infra up | down | status`: the local Kafka and Postgres, as one unit.

What ``up`` started is written to a state file under ``Settings.home`` so that
``status`` and ``down`` (in other processes) know the pids, ports and data
directories. External services (a bootstrap or a DSN in the settings) are
used as they are: never started, never stopped. ``up`` also writes the
network's genesis file and its services' keys when absent
(``streams.authority.ensure_genesis``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from destra.errors import InfraError
from destra.settings import Settings
from infra import kafka, postgres
from infra.procs import pid_alive, stop_pids
from ledger.migrate import apply_migrations
from streams.admin import ensure_topics, live_broker_count
from streams.authority import ensure_genesis


@dataclass
class BrokerState:
    """One local broker process."""

    node_id: int
    pid: int
    port: int
    data_dir: str
    log: str


@dataclass
class InfraState:
    """What is running, as recorded by ``up``."""

    kafka_bootstrap: str
    kafka_external: bool
    kafka_version: str
    brokers: list[BrokerState] = field(default_factory=list)
    pg_dsn: str = ""
    pg_external: bool = False
    pg_pid: int | None = None
    pg_data_dir: str | None = None
    pg_system_user: str | None = None

    def to_json(self) -> str:
        """Serialised for the state file."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> InfraState:
        """Read back from the state file."""
        raw: dict[str, Any] = json.loads(text)
        raw["brokers"] = [BrokerState(**b) for b in raw.get("brokers", [])]
        return cls(**raw)


def state_path(settings: Settings) -> Path:
    """The state file of the local services."""
    return settings.home / "infra.json"


def read_state(settings: Settings) -> InfraState | None:
    """The recorded state, or None when nothing was started."""
    path = state_path(settings)
    return InfraState.from_json(path.read_text()) if path.exists() else None


def up(settings: Settings) -> InfraState:
    """Start (or reuse) Kafka and Postgres, create topics, apply migrations."""
    previous = read_state(settings)
    if previous is not None and _all_alive(previous):
        _prepare(settings, previous)
        return previous
    if previous is not None:
        down(settings)  # half-dead leftovers from a crash: clear them first
    settings.home.mkdir(parents=True, exist_ok=True)
    state = InfraState(kafka_bootstrap="", kafka_external=False, kafka_version=kafka.KAFKA_VERSION)
    try:
        _start_kafka(settings, state)
        _start_postgres(settings, state)
        state_path(settings).write_text(state.to_json())
        _prepare(settings, state)
    except BaseException:
        state_path(settings).write_text(state.to_json())
        down(settings)
        raise
    return state


def _start_kafka(settings: Settings, state: InfraState) -> None:
    if settings.kafka_bootstrap:
        state.kafka_bootstrap, state.kafka_external = settings.kafka_bootstrap, True
        state.kafka_version = "external"
        if live_broker_count(settings.kafka_bootstrap, timeout_s=10) == 0:
            raise InfraError(f"external Kafka at {settings.kafka_bootstrap} does not answer")
        return
    libs = kafka.ensure_jars(settings.cache_dir)
    # One data directory per cluster shape: a 1-broker log cannot join a 3-voter quorum.
    cluster = kafka.KafkaCluster(settings.home / f"kafka-{settings.kafka_brokers}", libs,
                                 brokers=settings.kafka_brokers,
                                 port=settings.kafka_port, heap_mb=settings.kafka_heap_mb)
    cluster.format()
    state.kafka_bootstrap = cluster.bootstrap
    for node in cluster.nodes:
        cluster.start_node(node.node_id)
        # Recorded before waiting, so a failed start is still cleaned up by down().
        state.brokers.append(BrokerState(node.node_id, cluster.pids[node.node_id], node.port,
                                         str(node.data_dir), str(node.log_dir / "server.log")))
    cluster.wait_ready()


def _start_postgres(settings: Settings, state: InfraState) -> None:
    if settings.pg_dsn:
        state.pg_dsn, state.pg_external = settings.pg_dsn, True
        postgres.server_version(settings.pg_dsn)  # fails clearly if it does not answer
        return
    handle = postgres.start_embedded(settings.home / "postgres")
    state.pg_dsn, state.pg_pid = handle.dsn, handle.pid
    state.pg_data_dir, state.pg_system_user = str(handle.data_dir), handle.system_user


def _prepare(settings: Settings, state: InfraState) -> None:
    ensure_genesis(settings.genesis_path, settings.service_keys)
    ensure_topics(state.kafka_bootstrap, settings.topic_prefix,
                  replication_factor=settings.replication_factor,
                  min_insync_replicas=settings.min_insync_replicas)
    apply_migrations(state.pg_dsn)


def _all_alive(state: InfraState) -> bool:
    brokers_ok = all(pid_alive(b.pid) for b in state.brokers)
    pg_ok = state.pg_external or (state.pg_pid is not None and pid_alive(state.pg_pid))
    return brokers_ok and pg_ok


def down(settings: Settings) -> list[str]:
    """Stop what ``up`` started; returns what was stopped. Leaves no process behind."""
    state = read_state(settings)
    if state is None:
        return []
    stopped = []
    if state.pg_data_dir and not state.pg_external:
        postgres.stop_embedded(Path(state.pg_data_dir), state.pg_system_user)
        stopped.append(f"postgres (pid {state.pg_pid})")
    pids = [b.pid for b in state.brokers if pid_alive(b.pid)]
    stop_pids(pids, grace_s=30.0)
    stopped += [f"kafka broker {b.node_id} (pid {b.pid})" for b in state.brokers]
    left = [b.pid for b in state.brokers if pid_alive(b.pid)]
    if state.pg_pid is not None and not state.pg_external and pid_alive(state.pg_pid):
        left.append(state.pg_pid)
    if left:
        raise InfraError(f"processes still running after down: {left}")
    state_path(settings).unlink()
    return stopped


def status(settings: Settings) -> dict[str, Any]:
    """Addresses, pids, versions, data directories and liveness of both services."""
    state = read_state(settings)
    if state is None:
        return {"running": False, "state_file": str(state_path(settings))}
    live = live_broker_count(state.kafka_bootstrap, timeout_s=3)
    pg_version = None
    try:
        pg_version = postgres.server_version(state.pg_dsn)
    except InfraError:
        pass
    return {
        "running": live > 0 and pg_version is not None,
        "state_file": str(state_path(settings)),
        "genesis": str(settings.genesis_path),
        "kafka": {
            "bootstrap": state.kafka_bootstrap,
            "external": state.kafka_external,
            "version": state.kafka_version,
            "live_brokers": live,
            "brokers": [dict(asdict(b), alive=pid_alive(b.pid)) for b in state.brokers],
        },
        "postgres": {
            "dsn": state.pg_dsn,
            "external": state.pg_external,
            "version": pg_version,
            "pid": state.pg_pid,
            "alive": state.pg_external or (state.pg_pid is not None and pid_alive(state.pg_pid)),
            "data_dir": state.pg_data_dir,
        },
    }
