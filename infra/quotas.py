"""Client quotas per principal: one node or account cannot flood the broker.

Kafka's quotas are dynamic broker configuration, keyed by principal (``users``). A
default for every principal (``--entity-default``) bounds each node and account:
``DEFAULT`` below. The operator (``admin``) and a network's services get ``SERVICE``,
limits far above anything they do, so the network itself is never throttled. A
principal over its byte rate is not refused: the broker delays its responses (and
mutes its connection) until its rate over the quota window falls back to the quota.

confluent-kafka's AdminClient has no client-quota API, so the quotas are set with
Kafka's own ``kafka-configs`` (``org.apache.kafka.tools.ConfigCommand``) from the
cached jars, one JVM per entity (the tool alters one entity a call), the JVMs run side
by side. ``destra infra up`` sets them once per broker data directory (a marker file
records what was set); the tests' session broker sets the default and the admin's.
A plaintext (``--insecure``) broker has no principals, so it gets no quotas.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import InfraError
from streams.security import SCRAM_MECHANISM, KafkaAccess

_DIST = Path(__file__).with_name("kafka_dist")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Quota:
    """A principal's limits: bytes/s produced, bytes/s fetched, and the share of one
    broker thread (network and I/O request handling) its requests may take, in %."""

    producer_byte_rate: int
    consumer_byte_rate: int
    request_percentage: int

    def config(self) -> str:
        """The ``--add-config`` value."""
        return (f"producer_byte_rate={self.producer_byte_rate},"
                f"consumer_byte_rate={self.consumer_byte_rate},"
                f"request_percentage={self.request_percentage}")


DEFAULT = Quota(producer_byte_rate=4 * MIB, consumer_byte_rate=16 * MIB, request_percentage=100)
"""Every principal without its own quota: each node and each account. A node writes a
few hundred bytes per heartbeat, commit and reveal, a submitter a few KB per submission
(payloads travel as blobs, not records), so 4 MiB/s is hundreds of times their need,
and a flood from one of them is held to it."""

SERVICE = Quota(producer_byte_rate=1024 * MIB, consumer_byte_rate=1024 * MIB,
                request_percentage=10_000)
"""The operator and the services: in effect no limit (1 GiB/s, 100 threads)."""


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise InfraError("java is not on PATH; Kafka's tools need Java 17 or later")
    return java


def _command_config(access: KafkaAccess, directory: Path) -> Path:
    """The Admin client properties of ``access`` for Kafka's tools (0600)."""
    ca = directory / "ca.pem"
    ca.write_text(access.ca_pem)
    props = directory / "admin.properties"
    fd = os.open(props, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("security.protocol=SASL_SSL\n"
                f"sasl.mechanism={SCRAM_MECHANISM}\n"
                "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule "
                f'required username="{access.username}" password="{access.password}";\n'
                "ssl.truststore.type=PEM\n"
                f"ssl.truststore.location={ca}\n")
    return props


def set_quotas(libs: Path, bootstrap: str, access: KafkaAccess, *,
               default: Quota | None = DEFAULT, users: Iterable[str] = (),
               user_quota: Quota = SERVICE, timeout_s: float = 120.0) -> None:
    """Set ``default`` for every principal and ``user_quota`` for each of ``users``, as
    the super user ``access``; one JVM per entity, all at once."""
    if not access.secure:
        return  # a plaintext broker: every client is ANONYMOUS, nobody to tell apart
    entities: list[tuple[list[str], Quota]] = []
    if default is not None:
        entities.append((["--entity-default"], default))
    entities += [(["--entity-name", user], user_quota) for user in dict.fromkeys(users)]
    with tempfile.TemporaryDirectory(prefix="destra-quotas-") as tmp:
        props = _command_config(access, Path(tmp))
        procs = []
        for entity, quota in entities:
            cmd = [_java(), "-Xmx128m", "-XX:TieredStopAtLevel=1", "-cp", f"{libs}/*",
                   f"-Dlog4j2.configurationFile={_DIST / 'log4j2.xml'}",
                   f"-Dkafka.logs.dir={tmp}", "org.apache.kafka.tools.ConfigCommand",
                   "--bootstrap-server", bootstrap, "--command-config", str(props),
                   "--alter", "--entity-type", "users", *entity,
                   "--add-config", quota.config()]
            procs.append((entity, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True)))
        failed = []
        for entity, proc in procs:
            try:
                out, _ = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0:
                failed.append(f"{' '.join(entity)}: {out[-1000:]}")
        if failed:
            raise InfraError("could not set the client quotas: " + "; ".join(failed))


def ensure_quotas(libs: Path, bootstrap: str, access: KafkaAccess, users: Iterable[str],
                  marker: Path) -> bool:
    """``set_quotas`` unless ``marker`` says these exact quotas were set already on this
    broker; returns whether it set them."""
    users = sorted(set(users))
    want = "\n".join([bootstrap, DEFAULT.config(), SERVICE.config(), *users]) + "\n"
    if marker.exists() and marker.read_text() == want:
        return False
    set_quotas(libs, bootstrap, access, users=users)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(want)
    return True
