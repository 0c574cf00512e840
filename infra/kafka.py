"""A real Apache Kafka (KRaft) on loopback: jars from Maven Central, JVM subprocesses.

One broker runs as a combined broker+controller formatted with
``--standalone`` (a dynamic one-voter quorum). Three brokers form a static
three-voter quorum, each node both broker and controller, for the
reliability tests: replication factor 3 and ``min.insync.replicas=2``.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from destra.errors import InfraError
from infra.procs import pid_alive, stop_pids
from infra.tls import BROKER_PRINCIPAL, TlsFiles, ensure_tls
from streams.security import ADMIN, SCRAM_MECHANISM, KafkaAccess

KAFKA_VERSION = "4.4.0"
_DIST = Path(__file__).with_name("kafka_dist")
_READY_TIMEOUT_S = 120.0


def jars_dir(cache_dir: Path) -> Path:
    """Where the Kafka jars of this version are cached, once per machine."""
    return cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"


def ensure_jars(cache_dir: Path) -> Path:
    """Fetch the broker and tools jars with Maven unless already cached."""
    libs = jars_dir(cache_dir)
    done = libs / ".complete"
    if done.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError("Maven (mvn) is not on PATH; it is needed once to fetch the Kafka jars")
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(_DIST / "pom.xml"),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
        f"-Dkafka.version={KAFKA_VERSION}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InfraError(f"mvn could not fetch Kafka {KAFKA_VERSION}: {result.stdout[-2000:]}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    done.write_text(KAFKA_VERSION)
    return libs


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's own ``Uuid.randomUuid``, never one starting with ``-``, which
    command-line parsers take for an option (it happens to 1 id in 64).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True)
class BrokerNode:
    """One combined broker+controller process of a local cluster."""

    node_id: int
    port: int
    controller_port: int
    data_dir: Path

    @property
    def log_dir(self) -> Path:
        """Where the broker's own logs (server.log, stdout) go."""
        return self.data_dir / "logs"

    @property
    def config_path(self) -> Path:
        """The generated server.properties."""
        return self.data_dir / "server.properties"


EXTERNAL_PORT_OFFSET = 300
"""An advertised address named without a port listens ``kafka_port + 300`` (+10 for each
further address; broker i of a cluster on that + i - 1): clear of the client ports, the
controller ports (+100) and the bench's plaintext ports (+200)."""

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                       r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$", re.IGNORECASE)


@dataclass(frozen=True)
class Advertised:
    """An address other machines reach the brokers at: ``host`` (a DNS name or an IP)
    and the first broker's port there."""

    host: str
    port: int

    def listener_host(self) -> str:
        """The host as a listener URL takes it (an IPv6 address in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def bind_host(self) -> str:
        """Every local address of the host's family: the advertised one may be a name,
        or an address that a NAT in front of this machine owns."""
        return "[::]" if ":" in self.host else "0.0.0.0"  # noqa: S104 (the point of it)

    def __str__(self) -> str:
        return f"{self.listener_host()}:{self.port}"


def parse_advertised(entries: list[str], kafka_port: int) -> list[Advertised]:
    """``HOST[:PORT]`` entries (comma lists allowed; IPv6 as ``[addr]:port``) as addresses;
    one without a port gets ``kafka_port + 300 + 10 * its index``. Raises ``InfraError``."""
    flat = [e.strip() for entry in entries for e in entry.split(",") if e.strip()]
    out: list[Advertised] = []
    for index, entry in enumerate(flat):
        host, port_text = entry, ""
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise InfraError(f"advertised address {entry!r}: expected [IPv6]:PORT")
            port_text = rest[1:]
        elif entry.count(":") == 1:
            host, port_text = entry.split(":")
        elif ":" in entry:  # a bare IPv6 address
            host = entry
        if not _is_ip(host) and (":" in host or not _HOSTNAME.match(host)):
            raise InfraError(f"advertised address {entry!r}: {host!r} is neither an IP "
                             "address nor a DNS name")
        if _is_ip(host) and ipaddress.ip_address(host).is_unspecified:
            raise InfraError(f"advertised address {entry!r}: clients cannot connect to "
                             f"{host}; name this machine's address or DNS name")
        default = kafka_port + EXTERNAL_PORT_OFFSET + 10 * index
        try:
            port = int(port_text) if port_text else default
        except ValueError:
            raise InfraError(f"advertised address {entry!r}: port {port_text!r} is not a "
                             "number") from None
        if not 1024 <= port <= 65000:
            raise InfraError(f"advertised address {entry!r}: port {port} out of 1024..65000")
        out.append(Advertised(host if _is_ip(host) else host.lower(), port))
    ports = [a.port for a in out]
    if len(set(ports)) != len(ports) or any(kafka_port <= p < kafka_port + 3 or
                                           kafka_port + 100 <= p < kafka_port + 103
                                           for p in ports):
        raise InfraError(f"advertised addresses {', '.join(map(str, out))}: each needs a "
                         f"port of its own, clear of the client ports ({kafka_port}..) and "
                         f"the controller ports ({kafka_port + 100}..)")
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class BrokerSecurity:
    """TLS everywhere and SASL/SCRAM for clients: how a secured cluster is set up.

    Clients reach the ``CLIENT`` listener over TLS and authenticate with
    SCRAM-SHA-512; the brokers talk to each other there too, as the ``admin``
    principal, whose SCRAM credential is written into the metadata log when the
    storage is formatted. The ``CONTROLLER`` listener is mutual TLS: a broker presents
    its certificate (``CN=destra-broker``). Both are super users; every other
    principal gets only what its ACLs allow (``streams.security``), and a principal
    without ACLs gets nothing.
    """

    tls: TlsFiles
    admin_password: str
    plaintext_port: int | None = None
    """An extra PLAINTEXT listener whose anonymous clients are super users: only for
    ``bench/backbone.py``, to compare against on the same broker."""

    def admin_access(self) -> KafkaAccess:
        """The super user's client settings."""
        return KafkaAccess.scram(ADMIN, self.admin_password, self.tls.ca_pem())


def new_security(tls_dir: Path, plaintext_port: int | None = None) -> BrokerSecurity:
    """A CA and broker certificate in ``tls_dir`` (made once) and a fresh admin password:
    for a cluster whose data directory is new (tests, benches)."""
    return BrokerSecurity(ensure_tls(tls_dir), secrets.token_urlsafe(24), plaintext_port)


class KafkaCluster:
    """Starts, stops and kills the broker processes of a local KRaft cluster."""

    def __init__(
        self,
        base_dir: Path,
        libs: Path,
        *,
        brokers: int = 1,
        port: int = 19092,
        heap_mb: int = 384,
        security: BrokerSecurity | None = None,
        advertise: list[Advertised] | None = None,
    ) -> None:
        if brokers not in (1, 3):
            raise InfraError(f"a local cluster has 1 or 3 brokers, not {brokers}")
        if advertise and security is None:
            raise InfraError("a plaintext (--insecure) broker is never advertised to other "
                             "machines: anyone who reached it could write anything")
        self.advertise = list(advertise or [])
        """Addresses other machines reach the brokers at, each on its own SASL_SSL listener
        bound to every local address (``EXTERNAL``, ``EXTERNAL_2``, ...); the ``CLIENT``
        listener the local processes use stays on loopback, and so does the controller's."""
        self.base_dir = base_dir
        self.libs = libs
        self.heap_mb = heap_mb
        self.security = security
        """None: plaintext, no authentication, no ACLs (``--insecure``)."""
        # Controller ports sit 100 above the client ports so both ranges stay contiguous.
        self.nodes = [
            BrokerNode(i + 1, port + i, port + 100 + i, base_dir / f"broker-{i + 1}")
            for i in range(brokers)
        ]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def pids(self) -> dict[int, int]:
        """Process id of each running broker, by node id."""
        return {node_id: proc.pid for node_id, proc in self.procs.items()}

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers for clients."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def access(self) -> KafkaAccess:
        """How a super-user client reaches this cluster (plaintext when insecure)."""
        return self.security.admin_access() if self.security else KafkaAccess.plaintext()

    @property
    def replication_factor(self) -> int:
        """Replicas per partition for topics on this cluster."""
        return len(self.nodes)

    def _properties(self, node: BrokerNode) -> str:
        many = len(self.nodes) > 1
        rf = 3 if many else 1
        lines = ["process.roles=broker,controller", f"node.id={node.node_id}",
                 *self._listener_lines(node)]
        lines += [
            f"log.dirs={node.data_dir / 'data'}",
            "auto.create.topics.enable=false",
            "num.partitions=3",
            f"default.replication.factor={rf}",
            f"min.insync.replicas={2 if many else 1}",
            f"offsets.topic.replication.factor={rf}",
            "offsets.topic.num.partitions=12",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={2 if many else 1}",
            f"share.coordinator.state.topic.replication.factor={rf}",
            f"share.coordinator.state.topic.min.isr={2 if many else 1}",
            "group.initial.rebalance.delay.ms=0",
            # The processors workers' leases (streams.leases) may fail over faster than
            # the 6 s the broker allows by default.
            "group.min.session.timeout.ms=1000",
            # Unclean election would let a lagging replica lose acknowledged writes.
            "unclean.leader.election.enable=false",
            "num.network.threads=2",
            "num.io.threads=4",
            "log.segment.bytes=67108864",
        ]
        if many:
            voters = ",".join(
                f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes
            )
            lines.append(f"controller.quorum.voters={voters}")
        else:
            lines.append(f"controller.quorum.bootstrap.servers=127.0.0.1:{node.controller_port}")
        return "\n".join(lines) + "\n"

    def _listener_lines(self, node: BrokerNode) -> list[str]:
        controller = f"CONTROLLER://127.0.0.1:{node.controller_port}"
        if self.security is None:
            return [
                f"listeners=PLAINTEXT://127.0.0.1:{node.port},{controller}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{node.port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            ]
        sec = self.security
        listeners = [f"CLIENT://127.0.0.1:{node.port}", controller]
        advertised = [f"CLIENT://127.0.0.1:{node.port}"]
        protocols = ["CLIENT:SASL_SSL", "CONTROLLER:SSL"]
        supers = [f"User:{ADMIN}", BROKER_PRINCIPAL]
        jaas = [f"listener.name.client.{SCRAM_MECHANISM.lower()}.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{ADMIN}" password="{sec.admin_password}";']
        for index, addr in enumerate(self.advertise):
            name = "EXTERNAL" if index == 0 else f"EXTERNAL_{index + 1}"
            port = addr.port + node.node_id - 1
            listeners.append(f"{name}://{addr.bind_host()}:{port}")
            advertised.append(f"{name}://{addr.listener_host()}:{port}")
            protocols.append(f"{name}:SASL_SSL")
            # The broker side of SCRAM only: nobody logs in from this listener outward.
            jaas.append(f"listener.name.{name.lower()}.{SCRAM_MECHANISM.lower()}.sasl.jaas."
                        "config=org.apache.kafka.common.security.scram.ScramLoginModule "
                        "required;")
        if sec.plaintext_port is not None:
            port = sec.plaintext_port + node.node_id - 1
            listeners.append(f"PLAIN://127.0.0.1:{port}")
            advertised.append(f"PLAIN://127.0.0.1:{port}")
            protocols.append("PLAIN:PLAINTEXT")
            supers.append("User:ANONYMOUS")
        return [
            f"listeners={','.join(listeners)}",
            f"advertised.listeners={','.join(advertised)}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=CLIENT",
            f"listener.security.protocol.map={','.join(protocols)}",
            f"sasl.enabled.mechanisms={SCRAM_MECHANISM}",
            f"sasl.mechanism.inter.broker.protocol={SCRAM_MECHANISM}",
            *jaas,
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={sec.tls.broker_keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={sec.tls.ca_cert}",
            "listener.name.controller.ssl.client.auth=required",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users={';'.join(supers)}",
            "allow.everyone.if.no.acl.found=false",
        ]

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise InfraError("java is not on PATH; Kafka needs Java 17 or later")
        return java

    def _run_tool(self, main: str, args: list[str]) -> str:
        cmd = [self._java(), "-Xmx256m", "-cp", f"{self.libs}/*",
               f"-Dlog4j2.configurationFile={_DIST / 'log4j2.xml'}",
               f"-Dkafka.logs.dir={self.base_dir}", main, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            shown = " ".join(a for a in args if "password=" not in a)  # never the password
            raise InfraError(f"{main} {shown} failed: {result.stderr[-2000:]}")
        return result.stdout

    def write_configs(self) -> None:
        """Write each broker's server.properties (0600: a secured broker's holds the admin's
        SCRAM password). Rewritten at every start: the listeners may have changed. A broker
        formatted plaintext (no SCRAM credential in its metadata) cannot start secured, nor
        the other way round: ``InfraError`` saying so, not a broker that never gets ready."""
        for node in self.nodes:
            node.log_dir.mkdir(parents=True, exist_ok=True)
            formatted = (node.data_dir / "data" / "meta.properties").exists()
            if formatted and node.config_path.exists():
                was = "sasl.enabled.mechanisms" in node.config_path.read_text()
                now = self.security is not None
                if was != now:
                    mode = {True: "secured (TLS + SASL/SCRAM)", False: "plaintext"}
                    raise InfraError(
                        f"{node.data_dir} was formatted for a {mode[was]} broker and cannot "
                        f"start {mode[now]}: start it as it was made "
                        f"({'without' if was else 'with'} --insecure), or delete "
                        f"{self.base_dir} (its topics and their events are lost) to make a "
                        "new one")
            node.config_path.unlink(missing_ok=True)
            fd = os.open(node.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self._properties(node))

    def format(self) -> None:
        """Write configs and format storage, unless already formatted."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.write_configs()
        if all((n.data_dir / "data" / "meta.properties").exists() for n in self.nodes):
            return
        cluster_id = new_cluster_id()
        for node in self.nodes:
            args = ["format", f"--cluster-id={cluster_id}", "-c", str(node.config_path)]
            if self.security is not None:
                # KRaft: the brokers' own SCRAM credential must exist before they start.
                args += ["--add-scram", f"{SCRAM_MECHANISM}=[name={ADMIN},"
                         f"password={self.security.admin_password}]"]
            if len(self.nodes) == 1:
                args.append("--standalone")
            self._run_tool("kafka.tools.StorageTool", args)

    def start_node(self, node_id: int) -> int:
        """Start one broker process, detached from this one; returns its pid."""
        node = self._node(node_id)
        node.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self._java(), f"-Xms{self.heap_mb}m", f"-Xmx{self.heap_mb}m",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={_DIST / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={node.log_dir}",
            "-cp", f"{self.libs}/*", "kafka.Kafka", str(node.config_path),
        ]
        with open(node.log_dir / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[node_id] = proc
        return proc.pid

    def start(self, timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Format if needed, start every broker, wait until all answer metadata."""
        self.format()
        for node in self.nodes:
            self.start_node(node.node_id)
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = _READY_TIMEOUT_S, brokers: int | None = None) -> None:
        """Block until the cluster reports ``brokers`` live brokers (default: all)."""
        from streams.admin import live_broker_count  # adapter import kept local to the call

        want = len(self.nodes) if brokers is None else brokers
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node_id, pid in self.pids.items():
                if not pid_alive(pid):
                    raise InfraError(
                        f"Kafka broker {node_id} exited during start; see "
                        f"{self._node(node_id).log_dir / 'server.log'}:\n{self.log_tail(node_id)}"
                    )
            if live_broker_count(self.bootstrap, timeout_s=2.0, access=self.access) >= want:
                return
            time.sleep(0.25)
        raise InfraError(f"Kafka at {self.bootstrap} not ready after {timeout_s:.0f}s")

    def kill(self, node_id: int) -> None:
        """SIGKILL one broker: a crash, no controlled shutdown."""
        proc = self.procs.pop(node_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop every broker (SIGTERM, then SIGKILL after a grace period)."""
        stop_pids(list(self.pids.values()), grace_s=grace_s)
        for proc in self.procs.values():
            proc.wait()  # reaped already by stop_pids; this only settles the Popen object
        self.procs.clear()

    def log_tail(self, node_id: int, lines: int = 30) -> str:
        """The last lines of a broker's logs, for error messages."""
        node = self._node(node_id)
        text = ""
        for name in ("stdout.log", "server.log"):
            path = node.log_dir / name
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def _node(self, node_id: int) -> BrokerNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise InfraError(f"no broker {node_id} in this cluster")
