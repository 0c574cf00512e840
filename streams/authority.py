"""The network's own services as signers: the genesis file and who may emit what.

Some events only the network's services may emit: an assignment, a verdict, a
penalty, a ledger entry, a mint, a price. Nobody trusts one because of the
topic it is on (anyone who reaches the broker can write there): each must be
signed by a service role the table below allows for its type, with that role's
key in the network's genesis file. Every consumer runs ``Genesis.check`` before
acting on an event and dead-letters what it refuses.

The genesis file (``$DESTRA_HOME/genesis.json``, public) fixes one Ed25519
key per role; the private keys live with the operator who runs each service
(``$DESTRA_HOME/services/<role>.key``, 0600). ``destra infra up`` and
``LocalNetwork`` write both when absent (``ensure_genesis``). Paths come from
``Settings.genesis_path`` and ``Settings.service_keys``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from schemas.errors import ConfigError, UnauthenticatedEvent
from schemas.events import Event
from schemas.signatures import PUBLIC_KEY_BYTES, KeyPair, sign_event, verify_event

ROLES = ("allocator", "verifier", "ledger", "treasury", "pricing", "governance")
"""The network's service roles, each with its own key."""

AUTHORITY: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "TaskAssigned": ("allocator",),
    "RevealOpened": ("verifier",),
    "CheckpointRequested": ("verifier",),
    "ReissueRequested": ("verifier",),
    "TaskVerified": ("verifier",),
    "NodePenalized": ("verifier",),
    "TaskFailed": ("allocator", "verifier", "ledger"),
    "LedgerEntryPosted": ("ledger",),
    "TokensMinted": ("treasury",),
    "PriceUpdated": ("pricing",),
    "ProposalDecided": ("governance",),
    "ParameterChanged": ("governance",),
})
"""Event types only services emit, and the roles that may sign each. Every other event
is an outside party's (a node, a submitter), checked by the service that reads it."""

FORMAT = "destra-genesis/1"


def _roles_text(roles: Iterable[str]) -> str:
    roles = list(roles)
    return "the " + (roles[0] if len(roles) == 1
                     else ", ".join(roles[:-1]) + " or " + roles[-1])


@dataclass(frozen=True)
class Genesis:
    """The services' public keys, by role, as the genesis file fixes them."""

    keys: Mapping[str, bytes]
    """Each role's Ed25519 public key (32 bytes)."""

    def __post_init__(self) -> None:
        missing = [r for r in ROLES if r not in self.keys]
        if missing or set(self.keys) - set(ROLES):
            raise ConfigError(f"a genesis needs exactly the roles {', '.join(ROLES)}; "
                              f"missing {missing}, unknown {sorted(set(self.keys) - set(ROLES))}")
        bad = [r for r, k in self.keys.items() if len(k) != PUBLIC_KEY_BYTES]
        if bad:
            raise ConfigError(f"genesis keys must be {PUBLIC_KEY_BYTES} bytes: {bad}")

    def check(self, event: Event) -> str | None:
        """None when ``event`` may be acted on; else why not (a dead letter's reason)."""
        roles = AUTHORITY.get(event.name)
        if roles is None:
            return None
        who = _roles_text(roles)
        if event.signature is None or event.signer is None:
            return f"unsigned-authority-event: {event.name} must be signed by {who}"
        if event.signer not in roles:
            return (f"wrong-signer: {event.name} signed as {event.signer[:64]!r}, must be "
                    f"signed by {who}")
        if not verify_event(event, self.keys[event.signer], event.signer):
            return (f"bad-signature: {event.name} does not verify under the {event.signer}'s "
                    "genesis key")
        return None

    def require(self, event: Event) -> Event:
        """``event`` itself if ``check`` accepts it; else ``UnauthenticatedEvent``."""
        refusal = self.check(event)
        if refusal is not None:
            raise UnauthenticatedEvent(refusal)
        return event

    def to_json(self) -> str:
        """The genesis file's text."""
        return json.dumps({"format": FORMAT,
                           "keys": {role: self.keys[role].hex() for role in ROLES}}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Genesis:
        """Read a genesis file's text; ``ConfigError`` if it is not one."""
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            keys = {role: bytes.fromhex(key) for role, key in data["keys"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"not a Destra genesis file ({e})") from e
        return cls(keys)

    @classmethod
    def load(cls, path: Path) -> Genesis:
        """The genesis file at ``path``."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: no readable genesis file ({e.strerror}); run "
                              "`destra infra up`, or get the network's genesis.json "
                              "from its operator (DESTRA_GENESIS)") from e
        try:
            return cls.from_json(text)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def save(self, path: Path) -> None:
        """Write the genesis file (public: readable by all), atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)


@dataclass(frozen=True)
class ServiceSigner:
    """Signs the events one service role emits, with that role's key."""

    role: str
    keys: KeyPair

    def may_sign(self, name: str) -> bool:
        """Whether this role may emit events of type ``name``."""
        return self.role in AUTHORITY.get(name, ())

    def sign(self, event: Event) -> Event:
        """``event`` signed by this role; ``ConfigError`` for a type the role may not emit."""
        if not self.may_sign(event.name):
            raise ConfigError(f"the {self.role} may not emit {event.name}")
        return sign_event(event, self.keys, self.role)


def key_path(key_dir: Path, role: str) -> Path:
    """Where a service role's private key is kept."""
    if role not in ROLES:
        raise ConfigError(f"no service role {role!r}; roles: {', '.join(ROLES)}")
    return Path(key_dir) / f"{role}.key"


def ensure_genesis(genesis_path: Path, key_dir: Path) -> Genesis:
    """The network's genesis; on first use, a key per role in ``key_dir`` and the genesis
    file made of them. An existing genesis file is never rewritten: it is the network's
    identity."""
    if genesis_path.exists():
        _add_new_roles(genesis_path, key_dir)
        return Genesis.load(genesis_path)
    genesis = Genesis({role: KeyPair.load_or_create(key_path(key_dir, role)).signing_public
                       for role in ROLES})
    genesis.save(genesis_path)
    return genesis


def _add_new_roles(genesis_path: Path, key_dir: Path) -> None:
    """Give a genesis file made before a role existed (``governance`` came last) that
    role's key, made here: the upgrade of a network this operator runs. The roles it
    has keep their keys; nothing else is rewritten."""
    try:
        data = json.loads(Path(genesis_path).read_text())
        keys = dict(data["keys"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a genesis file: Genesis.load says why
    missing = [role for role in ROLES if role not in keys]
    if data.get("format") != FORMAT or not missing or set(keys) - set(ROLES):
        return
    for role in missing:
        keys[role] = KeyPair.load_or_create(key_path(key_dir, role)).signing_public.hex()
    Genesis({role: bytes.fromhex(keys[role]) for role in ROLES}).save(genesis_path)


def load_signer(key_dir: Path, role: str, genesis: Genesis) -> ServiceSigner:
    """The signer of ``role`` from this operator's key, checked against the genesis."""
    path = key_path(key_dir, role)
    if not path.exists():
        raise ConfigError(f"{path}: no {role} key; only the operator holding the network's "
                          f"{role} key can sign as the {role}")
    keys = KeyPair.load(path)
    if keys.signing_public != genesis.keys[role]:
        raise ConfigError(f"{path}: this {role} key is not the one the genesis file names")
    return ServiceSigner(role, keys)


def held_signers(key_dir: Path, genesis: Genesis,
                 roles: Iterable[str] = ROLES) -> list[ServiceSigner]:
    """The signers of ``roles`` whose keys this operator holds, in the order given."""
    return [load_signer(key_dir, role, genesis) for role in roles
            if key_path(key_dir, role).exists()]


def signers_by_event(signers: Iterable[ServiceSigner]) -> dict[str, ServiceSigner]:
    """For each authority event type, the first of ``signers`` allowed to sign it."""
    out: dict[str, ServiceSigner] = {}
    for signer in signers:
        for name in AUTHORITY:
            if signer.may_sign(name):
                out.setdefault(name, signer)
    return out
