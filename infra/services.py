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
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from destra.errors import ConfigError, InfraError
from destra.settings import Settings
from infra import kafka, postgres, quotas
from infra.notes import Step
from infra.procs import pid_alive, stop_pids
from infra.tls import ensure_tls, missing_hosts, tls_files
from ledger.migrate import apply_migrations
from streams import security
from streams.admin import ensure_topics, live_broker_count
from streams.authority import ensure_genesis
from streams.security import KafkaAccess


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
    kafka_secure: bool = True
    """TLS + SASL/SCRAM + ACLs; false only for a broker started ``--insecure``."""
    kafka_advertised: list[str] = field(default_factory=list)
    """``host:port`` of each address other machines reach the brokers at (``--advertise``);
    empty: loopback only."""

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


def admin_credentials(settings: Settings) -> Path:
    """The super user's Kafka credentials, beside the services' keys (0600)."""
    return security.service_credentials(settings.service_keys, security.ADMIN)


def tls_dir(settings: Settings) -> Path:
    """The local CA and broker certificate (``infra.tls``)."""
    return settings.home / "tls"


def advertise_path(settings: Settings) -> Path:
    """The recorded ``--advertise`` choice: kept across ``down``, reused by the next ``up``."""
    return settings.home / "kafka-advertise.json"


def chosen_advertise(settings: Settings) -> list[kafka.Advertised]:
    """The addresses to advertise: those the settings name (``none`` for none), else the
    ones recorded by the last ``up`` that named any."""
    if settings.kafka_advertise:
        if [a.strip().lower() for a in settings.kafka_advertise] == ["none"]:
            return []
        return kafka.parse_advertised(list(settings.kafka_advertise), settings.kafka_port)
    path = advertise_path(settings)
    if not path.exists():
        return []
    try:
        recorded = json.loads(path.read_text())["advertise"]
    except (ValueError, KeyError, TypeError) as e:
        raise InfraError(f"unreadable {path}: {e}; remove it or pass --advertise") from e
    return kafka.parse_advertised([str(a) for a in recorded], settings.kafka_port)


def _record_advertise(settings: Settings, advertise: list[kafka.Advertised]) -> None:
    path = advertise_path(settings)
    if settings.kafka_advertise:  # named now: remembered (``none`` forgets)
        if advertise:
            path.write_text(json.dumps({"advertise": [str(a) for a in advertise]}) + "\n")
        else:
            path.unlink(missing_ok=True)


def admin_access(settings: Settings, state: InfraState | None = None) -> KafkaAccess:
    """How the operator reaches the broker: plaintext for an insecure one, else the
    credentials ``DESTRA_KAFKA_CREDENTIALS`` names, else the admin's."""
    state = state if state is not None else read_state(settings)
    if insecure(settings, state):
        return KafkaAccess.plaintext()
    named = security.credentials_from_env()
    return named if named is not None else KafkaAccess.load(admin_credentials(settings))


def insecure(settings: Settings, state: InfraState | None = None) -> bool:
    """Whether this network's Kafka is plaintext: chosen so, or started ``--insecure``."""
    state = state if state is not None else read_state(settings)
    return settings.kafka_insecure or (
        state is not None and not settings.kafka_bootstrap and not state.kafka_secure)


def use_service_access(settings: Settings, role: str) -> KafkaAccess:
    """A service process's principal: its credentials beside its key (``<role>.kafka.json``),
    unless ``DESTRA_KAFKA_CREDENTIALS`` names others or the network is insecure."""
    return security.configure(security.service_credentials(settings.service_keys, role),
                              insecure=insecure(settings))


def up(settings: Settings, say: Callable[[str], None] = lambda _: None) -> InfraState:
    """Start (or reuse) Kafka and Postgres, create topics, apply migrations.

    ``say`` hears what the operator should know: a broker certificate reissued to name
    an advertised address; and each step as it begins, a ``Step`` note
    (the Kafka jars, the Kafka and Postgres starts, the genesis, topics, ACLs, quotas,
    migrations), for a progress display.
    """
    advertise = chosen_advertise(settings)
    if advertise and settings.kafka_bootstrap:
        raise InfraError("--advertise sets up a broker this command starts; an external "
                         f"Kafka ({settings.kafka_bootstrap}) is advertised by its own config")
    if advertise and settings.kafka_insecure:
        raise InfraError("--advertise with --insecure: a plaintext broker is never offered "
                         "to other machines")
    previous = read_state(settings)
    if previous is not None and _all_alive(previous):
        if not previous.kafka_external and previous.kafka_advertised != [
                str(a) for a in advertise]:
            raise InfraError(
                "the running broker is advertised at "
                f"{', '.join(previous.kafka_advertised) or 'loopback only'}, not at "
                f"{', '.join(map(str, advertise)) or 'loopback only'}: run `destra infra "
                "down`, then `destra infra up` with the new --advertise")
        _prepare(settings, previous, say)
        return previous
    if previous is not None:
        down(settings)  # half-dead leftovers from a crash: clear them first
    settings.home.mkdir(parents=True, exist_ok=True)
    state = InfraState(kafka_bootstrap="", kafka_external=False, kafka_version=kafka.KAFKA_VERSION,
                       kafka_secure=not settings.kafka_insecure)
    try:
        _start_kafka(settings, state, advertise, say)
        _record_advertise(settings, advertise)
        _start_postgres(settings, state, say)
        state_path(settings).write_text(state.to_json())
        _prepare(settings, state, say)
    except BaseException:
        state_path(settings).write_text(state.to_json())
        down(settings)
        raise
    return state


def _start_kafka(settings: Settings, state: InfraState, advertise: list[kafka.Advertised],
                 say: Callable[[str], None]) -> None:
    if settings.kafka_bootstrap:
        say(Step(f"Kafka: checking the external one at {settings.kafka_bootstrap}"))
        state.kafka_bootstrap, state.kafka_external = settings.kafka_bootstrap, True
        state.kafka_version = "external"
        if live_broker_count(settings.kafka_bootstrap, timeout_s=10,
                             access=admin_access(settings, state)) == 0:
            raise InfraError(f"external Kafka at {settings.kafka_bootstrap} does not answer")
        return
    say(Step(f"Kafka {kafka.KAFKA_VERSION} jars (Maven, cached once per machine)"))
    libs = kafka.ensure_jars(settings.cache_dir)
    brokers = settings.kafka_brokers
    say(Step(f"Kafka: starting {brokers} broker{'s' if brokers > 1 else ''}"))
    # One data directory per cluster shape: a 1-broker log cannot join a 3-voter quorum;
    # and per security: a secured broker's log holds the admin's SCRAM credential.
    data = settings.home / f"kafka-{settings.kafka_brokers}"
    broker_security = None
    if settings.kafka_insecure:
        data = data.with_name(data.name + "-insecure")
    else:
        hosts = [a.host for a in advertise]
        files = tls_files(tls_dir(settings))
        missing = missing_hosts(files, hosts) if files.broker_keystore.exists() else []
        broker_security = kafka.BrokerSecurity(ensure_tls(tls_dir(settings), hosts),
                                               _admin_password(settings))
        if missing:
            say(f"the broker certificate did not name {', '.join(missing)}: reissued "
                f"{files.broker_keystore} from the same CA ({files.ca_cert}); clients' "
                "credentials stay valid")
    cluster = kafka.KafkaCluster(data, libs, brokers=settings.kafka_brokers,
                                 port=settings.kafka_port, heap_mb=settings.kafka_heap_mb,
                                 security=broker_security, advertise=advertise)
    state.kafka_advertised = [str(a) for a in advertise]
    cluster.format()
    state.kafka_bootstrap = cluster.bootstrap
    for node in cluster.nodes:
        cluster.start_node(node.node_id)
        # Recorded before waiting, so a failed start is still cleaned up by down().
        state.brokers.append(BrokerState(node.node_id, cluster.pids[node.node_id], node.port,
                                         str(node.data_dir), str(node.log_dir / "server.log")))
    cluster.wait_ready()


def _admin_password(settings: Settings) -> str:
    """The super user's password: kept in its credentials file, made on first use."""
    path = admin_credentials(settings)
    if path.exists():
        return KafkaAccess.load(path).password
    access = KafkaAccess.scram(security.ADMIN, secrets.token_urlsafe(24),
                               ensure_tls(tls_dir(settings)).ca_pem())
    access.save(path)
    return access.password


def _start_postgres(settings: Settings, state: InfraState,
                    say: Callable[[str], None]) -> None:
    if settings.pg_dsn:
        say(Step("Postgres: checking the external one"))
        state.pg_dsn, state.pg_external = settings.pg_dsn, True
        postgres.server_version(settings.pg_dsn)  # fails clearly if it does not answer
        return
    say(Step("Postgres: starting"))
    handle = postgres.start_embedded(settings.home / "postgres")
    state.pg_dsn, state.pg_pid = handle.dsn, handle.pid
    state.pg_data_dir, state.pg_system_user = str(handle.data_dir), handle.system_user


def _prepare(settings: Settings, state: InfraState, say: Callable[[str], None]) -> None:
    say(Step("genesis and service keys"))
    ensure_genesis(settings.genesis_path, settings.service_keys)
    access = admin_access(settings, state)
    say(Step("topics"))
    ensure_topics(state.kafka_bootstrap, settings.topic_prefix,
                  replication_factor=settings.replication_factor,
                  min_insync_replicas=settings.min_insync_replicas, access=access)
    if access.secure:
        # The services' principals (credentials beside their keys) and every ACL.
        say(Step("principals and ACLs"))
        security.setup_network(state.kafka_bootstrap, settings.topic_prefix,
                               settings.service_keys, access.ca_pem, access)
        # Client quotas: a default for every principal (each node and account), the
        # operator and this network's services exempt (infra.quotas); set once per broker.
        say(Step("client quotas"))
        marker = (Path(state.brokers[0].data_dir).parent / "quotas.txt" if state.brokers
                  else settings.home / "kafka-external-quotas.txt")
        quotas.ensure_quotas(kafka.ensure_jars(settings.cache_dir), state.kafka_bootstrap,
                             access, [security.ADMIN, *(
                                 security.principal(settings.topic_prefix, role)
                                 for role in security.SERVICES)], marker)
    say(Step("Postgres migrations"))
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
    """Addresses, pids, versions, data directories and liveness of both services, and the
    metrics endpoints of the network's live processes (``streams.metrics``)."""
    from streams.metrics import registered

    state = read_state(settings)
    if state is None:
        return {"running": False, "state_file": str(state_path(settings)),
                "metrics": registered(settings.home)}
    try:
        live = live_broker_count(state.kafka_bootstrap, timeout_s=3,
                                 access=admin_access(settings, state))
    except ConfigError:
        live = 0
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
            "secure": state.kafka_secure,
            "advertised": state.kafka_advertised,
            "ca": str(tls_dir(settings) / "ca.pem") if state.kafka_secure else None,
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
        "metrics": registered(settings.home),
    }
