"""Who a process is to the broker, and what each principal may do there.

The one place for client security settings. Every Kafka client this project makes
takes its connection settings from ``client_config(bootstrap)``: the bootstrap
servers and this process's ``KafkaAccess``, which is

- SASL/SCRAM-SHA-512 over TLS, checking the broker's certificate against the
  network's CA (a party's credentials file: principal, password, CA certificate);
- or plaintext, only when chosen (``--insecure``, ``DESTRA_KAFKA_INSECURE=1``).

A process picks its principal once at start (``configure``): the file named by
``DESTRA_KAFKA_CREDENTIALS`` when set, else the one its role keeps beside its keys
(a service's ``<role>.kafka.json`` beside ``<role>.key``, a node's ``kafka.json``
beside its keystore, an account's ``<account>.kafka.json`` beside its keystore).
A client that must act as another principal passes ``access.config()`` as overrides.

Principals, per network (topic prefix ``P``): ``admin`` (a super user, made when
the storage is formatted), the services ``Pprocessors`` (allocator and verifier),
``Pledger`` (the ledger processor), ``Pprojector`` and ``Ptreasury``, one
``Pnode.<name>`` per node and one ``Paccount.<name>`` per submitter account. Their
ACLs (``network_acls``, ``node_acls``, ``account_acls``) name topics, consumer groups
and transactional ids literally or by prefix; there is no wildcard, and the broker
allows nothing that no ACL names (``allow.everyone.if.no.acl.found=false``).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)

from schemas.errors import ConfigError, InfraError
from streams.klog import KAFKA_LOG
from streams.topics import INBOX_PREFIX, topic_for

SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
ADMIN = "admin"
"""The super user: the brokers among themselves, ``destra infra up`` and the operator."""

CREDENTIALS_FORMAT = "destra-kafka-credentials/1"

SERVICES = ("processors", "ledger", "projector", "treasury")
"""The services' principals: one per process kind (allocator and verifier share the
processors worker, the projector folds both projections)."""

INSECURE_WARNING = (
    "WARNING: Kafka over PLAINTEXT (--insecure / DESTRA_KAFKA_INSECURE): no encryption, "
    "no authentication, no ACLs. Anyone who reaches the broker can read and write every "
    "topic. For local debugging only.")


@dataclass(frozen=True)
class KafkaAccess:
    """How this process reaches the broker: a SCRAM principal over TLS, or plaintext."""

    username: str | None = None
    password: str = field(default="", repr=False)
    ca_pem: str = field(default="", repr=False)

    @classmethod
    def plaintext(cls) -> KafkaAccess:
        """No TLS, no authentication: only a broker started ``--insecure`` takes it."""
        return cls()

    @classmethod
    def scram(cls, username: str, password: str, ca_pem: str) -> KafkaAccess:
        """A SCRAM-SHA-512 principal over TLS, trusting the CA in ``ca_pem``."""
        return cls(username, password, ca_pem)

    @property
    def secure(self) -> bool:
        """Whether this is an authenticated TLS connection."""
        return self.username is not None

    def config(self) -> dict[str, Any]:
        """The librdkafka settings of this access (not the bootstrap servers)."""
        if not self.secure:
            return {"security.protocol": "plaintext"}
        return {"security.protocol": "sasl_ssl", "sasl.mechanism": SCRAM_MECHANISM,
                "sasl.username": self.username, "sasl.password": self.password,
                "ssl.ca.pem": self.ca_pem, "ssl.endpoint.identification.algorithm": "https"}

    def save(self, path: Path) -> None:
        """Write this principal's credentials file (0600, replaced atomically)."""
        if not self.secure:
            raise ConfigError("plaintext access has no credentials to save")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": CREDENTIALS_FORMAT, "principal": self.username,
                "mechanism": SCRAM_MECHANISM, "password": self.password, "ca_pem": self.ca_pem}
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> KafkaAccess:
        """Read a credentials file; a missing or malformed one is a ``ConfigError``."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"no Kafka credentials at {path}") from e
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"unreadable Kafka credentials {path}: {e}") from e
        if not isinstance(data, dict) or data.get("format") != CREDENTIALS_FORMAT:
            raise ConfigError(f"{path} is not a Destra Kafka credentials file")
        user, password, ca = (data.get(k) for k in ("principal", "password", "ca_pem"))
        if not (isinstance(user, str) and user and isinstance(password, str) and password
                and isinstance(ca, str) and ca) or data.get("mechanism") != SCRAM_MECHANISM:
            raise ConfigError(f"{path}: principal, password, ca_pem and mechanism "
                              f"{SCRAM_MECHANISM} are required")
        return cls.scram(user, password, ca)


# ---------------------------------------------------------------- this process's access

_current: KafkaAccess | None = None


def use(access: KafkaAccess) -> KafkaAccess:
    """Make ``access`` this process's principal for every client made from now on."""
    global _current
    _current = access
    return access


def configure(credentials: Path | None, *, insecure: bool,
              env: Mapping[str, str] | None = None) -> KafkaAccess:
    """Choose this process's principal at start: ``DESTRA_KAFKA_CREDENTIALS`` when set,
    else plaintext when ``insecure`` (with a loud warning), else ``credentials``."""
    env = os.environ if env is None else env
    if env.get("DESTRA_KAFKA_CREDENTIALS"):
        return use(KafkaAccess.load(Path(env["DESTRA_KAFKA_CREDENTIALS"]).expanduser()))
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return use(KafkaAccess.plaintext())
    if credentials is None:
        raise ConfigError("no Kafka credentials: set DESTRA_KAFKA_CREDENTIALS")
    return use(KafkaAccess.load(credentials))


def credentials_from_env(env: Mapping[str, str] | None = None) -> KafkaAccess | None:
    """The access ``DESTRA_KAFKA_CREDENTIALS`` names, or None when unset."""
    path = (os.environ if env is None else env).get("DESTRA_KAFKA_CREDENTIALS")
    return KafkaAccess.load(Path(path).expanduser()) if path else None


def current() -> KafkaAccess:
    """This process's access; unset, it is read from ``DESTRA_KAFKA_CREDENTIALS`` or
    ``DESTRA_KAFKA_INSECURE``, and with neither it is a ``ConfigError``."""
    if _current is not None:
        return _current
    if os.environ.get("DESTRA_KAFKA_CREDENTIALS") or insecure_env():
        return configure(None, insecure=insecure_env())
    raise ConfigError("no Kafka credentials chosen for this process: set "
                      "DESTRA_KAFKA_CREDENTIALS, or DESTRA_KAFKA_INSECURE=1 for a plaintext broker")


def insecure_env(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``DESTRA_KAFKA_INSECURE`` asks for plaintext."""
    value = (os.environ if env is None else env).get("DESTRA_KAFKA_INSECURE", "")
    return value.strip().lower() in ("1", "true", "yes")


def client_config(bootstrap: str, access: KafkaAccess | None = None) -> dict[str, Any]:
    """Bootstrap servers and security settings: the start of every client's config."""
    return {"bootstrap.servers": bootstrap, **(access or current()).config()}


# ---------------------------------------------------------------- principals and ACLs


def principal(prefix: str, role: str) -> str:
    """A service's principal name in the network of ``prefix``."""
    return f"{prefix}{role}"


def node_principal(prefix: str, node: str) -> str:
    """A node's principal name."""
    return f"{prefix}node.{node}"


def account_principal(prefix: str, account: str) -> str:
    """A submitter account's principal name."""
    return f"{prefix}account.{account}"


def _topics(prefix: str, events: Iterable[str]) -> list[str]:
    return sorted({topic_for(e).name(prefix) for e in events})


def _allow(user: str, rtype: ResourceType, name: str, ops: Iterable[AclOperation],
           pattern: ResourcePatternType = ResourcePatternType.LITERAL) -> list[AclBinding]:
    return [AclBinding(rtype, name, pattern, f"User:{user}", "*", op, AclPermissionType.ALLOW)
            for op in ops]


_READ = (AclOperation.READ, AclOperation.DESCRIBE)
_WRITE = (AclOperation.WRITE, AclOperation.DESCRIBE)
_GROUP = (AclOperation.READ, AclOperation.DESCRIBE)
_TXN = (AclOperation.WRITE, AclOperation.DESCRIBE)


def _reads(user: str, topics: Iterable[str]) -> list[AclBinding]:
    return [b for t in topics for b in _allow(user, ResourceType.TOPIC, t, _READ)]


def _writes(user: str, topics: Iterable[str]) -> list[AclBinding]:
    return [b for t in topics for b in _allow(user, ResourceType.TOPIC, t, _WRITE)]


def _groups(user: str, prefixes: Iterable[str]) -> list[AclBinding]:
    return [b for g in prefixes
            for b in _allow(user, ResourceType.GROUP, g, _GROUP, ResourcePatternType.PREFIXED)]


# Short-lived readers (``streams.reading``, the client's watch, the tail) name a random
# group under one of these prefixes; they are assigned partitions, never subscribed.
_SCRATCH_GROUPS = ("wm-", "rebuild-", "watch-")
_DEAD = "deadletter"
_STATE = "processors.state"
_JOURNAL = "processors.journal"
_LEASES = "processors.leases"


def network_acls(prefix: str) -> list[AclBinding]:
    """The services' ACLs for the network of ``prefix``.

    Each service reads the network's topics (prefixed) and writes only what it emits:
    the processors assignments, reissues, verdicts, penalties, prices, governance's
    decisions and parameter changes; the ledger its entries
    and its stale-submission verdicts; the treasury mints. Every service writes dead
    letters; the transactional ones their state records.
    """
    acls: list[AclBinding] = []
    every = (AclOperation.READ, AclOperation.DESCRIBE, AclOperation.DESCRIBE_CONFIGS)
    for role in ("processors", "ledger", "projector"):
        user = principal(prefix, role)
        acls += _allow(user, ResourceType.TOPIC, prefix, every, ResourcePatternType.PREFIXED)
        acls += _writes(user, [prefix + _DEAD])
        acls += _groups(user, [*_SCRATCH_GROUPS, principal(prefix, role)])
    processors = principal(prefix, "processors")
    acls += _writes(processors, [prefix + _STATE, prefix + _JOURNAL, *_topics(prefix, (
        "TaskAssigned", "ReissueRequested", "TaskVerified", "NodePenalized", "PriceUpdated",
        "ProposalDecided", "ParameterChanged"))])
    # Each assignment and reveal call goes to its node's inbox too.
    acls += _inbox_writes(processors, prefix)
    acls += _groups(processors, [f"{prefix}processors"])
    acls += _allow(processors, ResourceType.TRANSACTIONAL_ID, f"{prefix}processors/", _TXN,
                   ResourcePatternType.PREFIXED)
    ledger = principal(prefix, "ledger")
    acls += _writes(ledger, [prefix + _STATE, *_topics(prefix, ("LedgerEntryPosted",
                                                                "TaskFailed"))])
    acls += _groups(ledger, [f"{prefix}ledger-processor"])
    acls += _allow(ledger, ResourceType.TRANSACTIONAL_ID, f"{prefix}ledger-processor", _TXN,
                   ResourcePatternType.PREFIXED)
    # Idempotent producers need IDEMPOTENT_WRITE on the cluster (implied by a
    # transactional id's WRITE, but not for the plain producers).
    for role in SERVICES:
        acls += _allow(principal(prefix, role), ResourceType.BROKER, "kafka-cluster",
                       (AclOperation.IDEMPOTENT_WRITE,))
    treasury = principal(prefix, "treasury")
    acls += _writes(treasury, _topics(prefix, ("TokensMinted",)))
    # `destra mint` checks the account is registered before it mints, then waits for the
    # ledger's entries or its refusal (a dead letter).
    acls += _reads(treasury, [*_topics(prefix, ("AccountRegistered", "LedgerEntryPosted")),
                              prefix + _DEAD])
    acls += _groups(treasury, _SCRATCH_GROUPS)
    return acls


def _inbox_writes(user: str, prefix: str) -> list[AclBinding]:
    """WRITE (and DESCRIBE, to find which exist) on every node's inbox topic."""
    return _allow(user, ResourceType.TOPIC, prefix + INBOX_PREFIX, _WRITE,
                  ResourcePatternType.PREFIXED)


def node_acls(prefix: str, node: str) -> list[AclBinding]:
    """A node writes its registration, heartbeats, commits and reveals; it reads only its
    own inbox topic (its assignments, grants and reveal calls, ``inbox_spec``), with its
    own consumer group: not ``tasks.assignments``, where every node's work is."""
    user = node_principal(prefix, node)
    return [
        *_writes(user, _topics(prefix, ("NodeRegistered", "NodeHeartbeat",
                                        "ResultCommitted", "ResultRevealed",
                                        "CheckpointProvided"))),
        *_reads(user, [prefix + INBOX_PREFIX + node]),
        *_groups(user, [f"{prefix}node-{node}"]),
        *_allow(user, ResourceType.BROKER, "kafka-cluster", (AclOperation.IDEMPOTENT_WRITE,)),
    ]


def obsolete_node_acls(prefix: str, node: str) -> list[AclBinding]:
    """What a node was allowed before inboxes and is no longer: reading the whole
    ``tasks.assignments`` topic. Deleted when its credentials are issued again."""
    return _reads(node_principal(prefix, node), _topics(prefix, ("TaskAssigned",)))


def account_acls(prefix: str, account: str) -> list[AclBinding]:
    """A submitter writes its registration, submissions and data-key grants (on the
    assignments topic and the node's inbox: any inbox, as a node believes a grant only
    when its submitter's key, named in the service-signed assignment, signed it); it
    reads what its client follows: the node registry (to wrap a grant), assignments,
    commits, reveals, verdicts and prices; it proposes and votes (``governance``),
    reading the proposals, ballots, decisions and parameter changes. It signs its own
    money operations (transfers, stakes, unstakes, withdrawals) and reads the ledger's
    entries and the dead letters to learn what became of them."""
    user = account_principal(prefix, account)
    return [
        *_writes(user, _topics(prefix, ("AccountRegistered", "TaskSubmitted",
                                        "DataKeyGranted", "AccountOperation",
                                        "ProposalSubmitted", "VoteCast"))),
        # Its transfers, stakes, unstakes and withdrawals wait for the ledger's entries or
        # its refusal (a dead letter): `destra transfer` and the like.
        *_reads(user, [*_topics(prefix, ("LedgerEntryPosted",)), prefix + _DEAD]),
        *_inbox_writes(user, prefix),
        *_reads(user, _topics(prefix, ("NodeRegistered", "TaskAssigned", "ResultCommitted",
                                       "ResultRevealed", "TaskVerified", "PriceUpdated",
                                       "ProposalSubmitted", "ParameterChanged"))),
        *_groups(user, _SCRATCH_GROUPS),
        *_allow(user, ResourceType.BROKER, "kafka-cluster", (AclOperation.IDEMPOTENT_WRITE,)),
    ]


# ---------------------------------------------------------------- the Admin API


def _admin(bootstrap: str, access: KafkaAccess | None) -> AdminClient:
    config: dict[str, Any] = {**client_config(bootstrap, access), "logger": KAFKA_LOG}
    return AdminClient(config)


def _wait(futures: Mapping[Any, Any], what: str, timeout_s: float) -> None:
    for key, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as e:
            raise InfraError(f"could not {what} {key}: {e.args[0].str()}") from e


def create_acls(bootstrap: str, acls: list[AclBinding], access: KafkaAccess | None = None,
                timeout_s: float = 30.0) -> None:
    """Create ACL bindings (idempotent: an existing binding is left as it is)."""
    acls = list(dict.fromkeys(acls))  # the Admin API refuses a binding twice in one call
    if acls:
        admin = _admin(bootstrap, access)  # held until the futures are done
        _wait(admin.create_acls(acls, request_timeout=timeout_s), "create ACL", timeout_s)


def delete_acls(bootstrap: str, acls: list[AclBinding], access: KafkaAccess | None = None,
                timeout_s: float = 30.0) -> None:
    """Delete exactly these ACL bindings (idempotent: a missing one is no error)."""
    from confluent_kafka.admin import AclBindingFilter

    filters = [AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal,
                                b.host, b.operation, b.permission_type)
               for b in dict.fromkeys(acls)]
    if filters:
        admin = _admin(bootstrap, access)  # held until the futures are done
        _wait(admin.delete_acls(filters, request_timeout=timeout_s), "delete ACL", timeout_s)


def issue(bootstrap: str, user: str, ca_pem: str, path: Path,
          access: KafkaAccess | None = None, timeout_s: float = 30.0) -> KafkaAccess:
    """Give ``user`` a SCRAM-SHA-512 credential and save it to ``path`` (0600)."""
    return issue_all(bootstrap, {user: path}, ca_pem, access, timeout_s)[user]


def issue_all(bootstrap: str, users: Mapping[str, Path], ca_pem: str,
              access: KafkaAccess | None = None,
              timeout_s: float = 30.0) -> dict[str, KafkaAccess]:
    """Give each user a SCRAM-SHA-512 credential, in one request, and save each to its
    path (0600). A user whose file exists keeps its password: it is set again on the
    broker, so a file kept across a new broker still works."""
    issued: dict[str, KafkaAccess] = {}
    for user, path in users.items():
        try:
            known: KafkaAccess | None = KafkaAccess.load(path)
        except ConfigError:
            known = None
        if known is None or known.username != user or known.ca_pem != ca_pem:
            known = KafkaAccess.scram(user, secrets.token_urlsafe(24), ca_pem)
        issued[user] = known
    if not issued:
        return issued
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(user, info, a.password.encode())
        for user, a in issued.items()]
    admin = _admin(bootstrap, access)  # held until the futures are done
    _wait(admin.alter_user_scram_credentials(upserts, request_timeout=timeout_s),
          "set the SCRAM credential of", timeout_s)
    for user, path in users.items():
        issued[user].save(path)
    return issued


def setup_network(bootstrap: str, prefix: str, key_dir: Path, ca_pem: str,
                  access: KafkaAccess | None = None) -> dict[str, KafkaAccess]:
    """The services' principals (credentials saved as ``<role>.kafka.json`` in
    ``key_dir``, beside their signing keys) and their ACLs, for one network."""
    issued = issue_all(bootstrap, {principal(prefix, role): service_credentials(key_dir, role)
                                   for role in SERVICES}, ca_pem, access)
    create_acls(bootstrap, network_acls(prefix), access)
    return {role: issued[principal(prefix, role)] for role in SERVICES}


def service_credentials(key_dir: Path, role: str) -> Path:
    """Where a service's Kafka credentials live: beside its signing key."""
    return key_dir / f"{role}.kafka.json"
