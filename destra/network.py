"""A whole local network as processes: the ledger processor and projector, a
processors worker (the allocator and the verifier's shards), and node runners.
Used by `destra demo`, the lifecycle tests and the lifecycle benchmark; each
process logs to its own file under ``workdir``."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from destra import keystore
from destra.errors import InfraError
from destra.settings import Settings
from governance.keys import ensure_tally_key
from ledger.processor import read_past
from schemas import Event, decode, new_event
from schemas.bindings import account_registration
from schemas.signatures import KeyPair
from streams import security
from streams.admin import ensure_inbox
from streams.authority import ServiceSigner, ensure_genesis, load_signer
from streams.producer import EventProducer
from streams.reading import end_offsets, read_all
from streams.security import KafkaAccess
from streams.topics import topic_for


@dataclass
class LocalNetwork:
    """Starts and stops the network's processes against one broker and one Postgres."""

    settings: Settings
    bootstrap: str
    pg_dsn: str
    workdir: Path
    env_extra: Mapping[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _pending_mints: list[tuple[Mapping[tuple[str, int], int], tuple[str, ...], int]] = field(
        default_factory=list)
    """Mints waiting for the ledger to bind their accounts (``mint``)."""
    access: KafkaAccess | None = None
    """The operator's access (a super user), which issues the network's principals;
    this process's own when unset. Each spawned process runs as its own principal."""

    def __post_init__(self) -> None:
        # The network's genesis and its services' keys, made on first use (a fixture may
        # have made them already); every process gets their paths.
        self.genesis = ensure_genesis(self.settings.genesis_path, self.settings.service_keys)
        ensure_tally_key(self.settings.genesis_path, self.settings.service_keys)
        if self.access is None:
            self.access = security.current()
        if self.access.secure:
            # The services' principals and ACLs, their credentials beside their keys.
            security.setup_network(self.bootstrap, self.settings.topic_prefix,
                                   self.settings.service_keys, self.access.ca_pem, self.access)
        # The keystores of this network's nodes and accounts are encrypted with a random
        # passphrase kept in a 0600 file beside the logs (a real operator uses their own).
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.passphrase_file = self.workdir / "passphrase"
        if not self.passphrase_file.exists():
            fd = os.open(self.passphrase_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))

    @property
    def passphrase(self) -> bytes:
        """The keystores' passphrase, for clients run in this process."""
        return self.passphrase_file.read_bytes()

    def env(self) -> dict[str, str]:
        """The environment every process of the network gets."""
        root = str(Path(__file__).resolve().parents[1])
        # Each process finds its own Kafka credentials (beside its keys), none inherited.
        env = {k: v for k, v in os.environ.items()
               if k not in ("DESTRA_PASSPHRASE", "DESTRA_KAFKA_CREDENTIALS",
                            "DESTRA_KAFKA_INSECURE")}
        assert self.access is not None
        if not self.access.secure:
            env["DESTRA_KAFKA_INSECURE"] = "1"
        return {**env, "DESTRA_KAFKA_BOOTSTRAP": self.bootstrap,
                "DESTRA_PG_DSN": self.pg_dsn, "DESTRA_TOPIC_PREFIX": self.settings.topic_prefix,
                "DESTRA_HOME": str(self.settings.home),
                "DESTRA_GENESIS": str(self.settings.genesis_path),
                "DESTRA_SERVICE_KEYS": str(self.settings.service_keys),
                "DESTRA_PASSPHRASE_FILE": str(self.passphrase_file),
                "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **self.env_extra}

    def signer(self, role: str) -> ServiceSigner:
        """A service role's signer (e.g. ``treasury`` to mint), from this network's keys."""
        return load_signer(self.settings.service_keys, role, self.genesis)

    def credentials(self, role: str) -> KafkaAccess:
        """A service's access (plaintext on an insecure network)."""
        assert self.access is not None
        if not self.access.secure:
            return self.access
        return KafkaAccess.load(security.service_credentials(self.settings.service_keys, role))

    def create_accounts(self, *accounts: str) -> None:
        """Each account's principal and ACLs, its credentials beside its keystore."""
        assert self.access is not None
        if not self.access.secure or not accounts:
            return
        prefix = self.settings.topic_prefix
        security.issue_all(self.bootstrap, {
            security.account_principal(prefix, a): keystore.account_credentials(self.settings, a)
            for a in accounts}, self.access.ca_pem, self.access)
        security.create_acls(self.bootstrap, [b for a in accounts
                                              for b in security.account_acls(prefix, a)],
                             self.access)

    def join_node(self, name: str) -> None:
        """A node's inbox topic, and (on a secure network) its principal and ACLs, its
        credentials beside its keystore."""
        assert self.access is not None
        prefix = self.settings.topic_prefix
        ensure_inbox(self.bootstrap, prefix, name,
                     replication_factor=self.settings.replication_factor,
                     min_insync_replicas=self.settings.min_insync_replicas,
                     access=self.access)
        if not self.access.secure:
            return
        security.issue(self.bootstrap, security.node_principal(prefix, name), self.access.ca_pem,
                       keystore.node_credentials(self.settings, name), self.access)
        security.create_acls(self.bootstrap, security.node_acls(prefix, name), self.access)
        security.delete_acls(self.bootstrap, security.obsolete_node_acls(prefix, name),
                             self.access)

    def account_keys(self, account: str) -> KeyPair:
        """An account's current keys, from its keystore under this network's home (made on
        first use, encrypted with the network's passphrase)."""
        return keystore.load_or_create(keystore.account_path(self.settings, account),
                                       self.passphrase).current

    def register_accounts(self, *accounts: str) -> dict[tuple[str, int], int]:
        """Each account's signed ``AccountRegistered`` (its keystore's keys), written as the
        operator; the registry topic's ends after them."""
        assert self.access is not None
        with EventProducer(self.settings, self.bootstrap, self.access.config()) as producer:
            for account in accounts:
                producer.send(account_registration(account, self.account_keys(account)))
        return end_offsets(self.bootstrap, topic_for("AccountRegistered").name(
            self.settings.topic_prefix))

    def wait_bound(self, ends: Mapping[tuple[str, int], int], timeout_s: float = 120.0) -> None:
        """Until the ledger processor has read the registry up to ``ends``: the accounts
        registered before them are bound, and a mint to them counts."""
        deadline = time.monotonic() + timeout_s
        while not read_past(self.settings, self.bootstrap, self.genesis.keys["ledger"], ends):
            self.check_alive()
            if time.monotonic() > deadline:
                raise InfraError(f"the ledger did not read the account registrations in "
                                 f"{timeout_s:.0f}s; logs in {self.workdir}")
            time.sleep(0.2)

    def mint(self, *accounts: str, amount_micro: int = 10**12) -> None:
        """Create each account's principal, register its keys and credit it, by
        ``TokensMinted`` events the treasury key signs, written as the treasury's principal.

        A mint to an account the ledger has not bound yet is refused, and the ledger reads
        the registry and the mints independently: the mints go once it has read the
        registrations (at ``start_services`` when it is not running yet)."""
        self.create_accounts(*accounts)
        ends = self.register_accounts(*accounts)
        self._pending_mints.append((ends, accounts, amount_micro))
        if self.running("ledger-processor"):
            self._send_mints()

    def _send_mints(self) -> None:
        pending, self._pending_mints = self._pending_mints, []
        for ends, accounts, amount_micro in pending:
            self.wait_bound(ends)
            with EventProducer(self.settings, self.bootstrap,
                               self.credentials("treasury").config(),
                               signer=self.signer("treasury")) as producer:
                for account in accounts:
                    producer.send(new_event("TokensMinted", "treasury", account=account,
                                            amount_micro=amount_micro,
                                            reason="local network"))

    def running(self, name: str) -> bool:
        """Whether the process ``name`` was started and has not exited."""
        return name in self.procs and self.procs[name].poll() is None

    def spawn(self, name: str, *args: str, producer_id: str | None = None) -> None:
        """Start ``python args...`` as the process ``name``."""
        if name in self.procs and self.procs[name].poll() is None:
            raise InfraError(f"{name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        env = {**self.env(), "DESTRA_PRODUCER_ID": producer_id or name}
        self.procs[name] = subprocess.Popen([sys.executable, *args], env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        log.close()

    def start_services(self) -> None:
        """The ledger processor, the projector (ledger and views) and a processors worker."""
        self.spawn("ledger-processor", "-m", "ledger.processor")
        self.spawn("projector", "-m", "ledger.service")
        self.spawn("processors", "-m", "destra.processors")
        self._send_mints()

    def start_node(self, name: str, *, operator: str | None = None, region: str = "eu-west",
                   stake_micro: int = 0, slots: int = 1, fault: str | None = None,
                   tier: str = "consumer", threads: int = 1) -> None:
        """One node runner process on ``threads`` torch threads; a stake is consented to
        with the operator's keystore under this network's home (made here if missing:
        then the operator is not registered and the ledger locks nothing)."""
        if stake_micro > 0:
            self.account_keys(operator or name)
        args = ["-m", "destra", "node", "run", "--name", name, "--operator", operator or name,
                "--region", region, "--stake", str(stake_micro), "--slots", str(slots),
                "--tier", tier, "--threads", str(threads)]
        if fault:
            args += ["--fault", fault]
        self.join_node(name)
        self.spawn(f"node-{name}", *args, producer_id=name)

    def wait_registered(self, names: list[str], timeout_s: float = 120.0) -> None:
        """Until every named node's registration is on the registry topic."""
        topic = topic_for("NodeRegistered").name(self.settings.topic_prefix)
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {decode(m.value()).fields["node_id"] for m in read_all(self.bootstrap, topic)}
            if set(names) <= seen:
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise InfraError(f"nodes not registered in {timeout_s:.0f}s: "
                                 f"{sorted(set(names) - seen)}; logs in {self.workdir}")
            time.sleep(0.5)

    def check_alive(self) -> None:
        """Raise if a process of the network died on its own."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None and code != -signal.SIGKILL:
                raise InfraError(f"{name} exited with {code}; see {self.workdir / name}.log")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process (SIGKILL: it gets no chance to clean up)."""
        self.procs[name].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait(30)

    def stop(self, timeout_s: float = 60.0) -> dict[str, int | None]:
        """SIGTERM every process, nodes first, then wait; SIGKILL what does not stop."""
        order = sorted(self.procs, key=lambda n: (not n.startswith("node-"), n))
        for name in order:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout_s
        for name in order:
            proc = self.procs[name]
            try:
                codes[name] = proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(10)
        return codes

    def events(self, name: str) -> list[Event]:
        """Every committed ``name`` event on its topic so far, in log order per partition."""
        topic = topic_for(name).name(self.settings.topic_prefix)
        return [e for e in (decode(m.value()) for m in read_all(self.bootstrap, topic))
                if e.name == name]

    def log(self, name: str) -> str:
        """A process's log so far."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
