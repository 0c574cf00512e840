"""Passphrase-encrypted key files for accounts and nodes (issue 4).

A keystore is a JSON file holding one current ``KeyPair`` and the keys it
replaced, sealed with AES-256-GCM under a key derived from a passphrase with
scrypt. The public keys sit in a plain header so they can be shown without the
passphrase; the associated data binds the sealed secrets to the signing key in
that header, and loading checks every header key against the secrets, so a
swapped header is refused.

The passphrase comes from ``DESTRA_PASSPHRASE`` or from the file named by
``DESTRA_PASSPHRASE_FILE``; there is never a default. A legacy plaintext key
file (``KeyPair.save``) is upgraded in place the first time it is loaded with a
passphrase.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from destra import crypto
from destra.crypto import SCRYPT_N, SCRYPT_P, SCRYPT_R, KeyPair
from destra.errors import ConfigError, DecryptionFailed, KeystoreError
from destra.settings import Settings

FORMAT = "destra-keystore"
VERSION = 1
CIPHER = "aes-256-gcm"
SALT_BYTES = 16
PASSPHRASE_ENV = "DESTRA_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
PASSPHRASE_FILE_ENV = "DESTRA_PASSPHRASE_FILE"  # noqa: S105
_MAX_SCRYPT_MEMORY = 128 * 2**20  # scrypt uses 128 * n * r bytes


@dataclass(frozen=True)
class Keyring:
    """The current keys and the ones they replaced, newest first."""

    current: KeyPair
    previous: tuple[KeyPair, ...] = ()

    def all(self) -> tuple[KeyPair, ...]:
        """Every key pair: the current one first, then the previous ones."""
        return (self.current, *self.previous)


@dataclass(frozen=True)
class _Retired:
    keys: KeyPair
    retired_at: int


@dataclass(frozen=True)
class _Kdf:
    n: int
    r: int
    p: int

    def __post_init__(self) -> None:
        n, r, p = self.n, self.r, self.p
        if (n < 2 or n & (n - 1) or r < 1 or not 1 <= p <= 16
                or 128 * n * r > _MAX_SCRYPT_MEMORY):
            raise KeystoreError(f"unsupported scrypt parameters n={n} r={r} p={p}")


# ---------------------------------------------------------------- passphrases


def read_passphrase_file(path: Path) -> bytes:
    """The passphrase in ``path``, one trailing newline stripped."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeystoreError(f"cannot read passphrase file {path}: {e.strerror or e}") from e
    for newline in (b"\r\n", b"\n"):
        if data.endswith(newline):
            data = data[: -len(newline)]
            break
    if not data:
        raise KeystoreError(f"passphrase file {path} is empty")
    return data


def passphrase_from_env(env: Mapping[str, str] | None = None) -> bytes | None:
    """The passphrase from ``DESTRA_PASSPHRASE`` or ``DESTRA_PASSPHRASE_FILE``; None if unset."""
    env = os.environ if env is None else env
    value, file = env.get(PASSPHRASE_ENV), env.get(PASSPHRASE_FILE_ENV)
    if value is not None and file is not None:
        raise KeystoreError(f"set only one of {PASSPHRASE_ENV} and {PASSPHRASE_FILE_ENV}")
    if value is not None:
        if not value:
            raise KeystoreError(f"{PASSPHRASE_ENV} is set but empty")
        return value.encode()
    if file is not None:
        if not file:
            raise KeystoreError(f"{PASSPHRASE_FILE_ENV} is set but empty")
        return read_passphrase_file(Path(file).expanduser())
    return None


def require_passphrase(env: Mapping[str, str] | None = None) -> bytes:
    """The passphrase from the environment; ``KeystoreError`` if none is given."""
    passphrase = passphrase_from_env(env)
    if passphrase is None:
        raise KeystoreError(f"no keystore passphrase: set {PASSPHRASE_ENV} or "
                            f"{PASSPHRASE_FILE_ENV} (a file holding it)")
    return passphrase


def _check_passphrase(passphrase: bytes) -> None:
    if not passphrase:
        raise KeystoreError("an empty passphrase is not allowed")


# ---------------------------------------------------------------- paths


def _check_name(kind: str, name: str) -> str:
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"invalid {kind} name {name!r}")
    return name


def account_path(settings: Settings, account: str) -> Path:
    """Where an account's keystore lives: ``$DESTRA_HOME/accounts/<account>.json``."""
    return settings.home / "accounts" / f"{_check_name('account', account)}.json"


def node_path(settings: Settings, node: str) -> Path:
    """Where a node's keystore lives: ``$DESTRA_HOME/nodes/<node>/keys.json``."""
    return settings.home / "nodes" / _check_name("node", node) / "keys.json"


def node_credentials(settings: Settings, node: str) -> Path:
    """A node's Kafka credentials (``destra node join``), beside its keystore."""
    return node_path(settings, node).with_name("kafka.json")


def account_credentials(settings: Settings, account: str) -> Path:
    """An account's Kafka credentials (``destra account create``), beside its keystore."""
    return account_path(settings, account).with_suffix(".kafka.json")


# ---------------------------------------------------------------- file format


def _public(keys: KeyPair) -> dict[str, str]:
    return {"signing": keys.signing_public.hex(), "encryption": keys.encryption_public.hex()}


def _secret(keys: KeyPair) -> dict[str, str]:
    return {"seed": keys.signing_seed.hex(), "secret": keys.encryption_secret.hex()}


def _associated(signing_public_hex: str) -> bytes:
    return crypto.associated_data("keystore", signing_public_hex)


def _encode(passphrase: bytes, current: KeyPair, previous: list[_Retired], kdf: _Kdf) -> str:
    """The keystore JSON, sealed under a fresh salt."""
    _check_passphrase(passphrase)
    salt = os.urandom(SALT_BYTES)
    secrets = {"current": _secret(current),
               "previous": [{**_secret(r.keys), "retired_at": r.retired_at} for r in previous]}
    public = _public(current)
    sealed = crypto.seal(crypto.passphrase_key(passphrase, salt, kdf.n, kdf.r, kdf.p),
                         json.dumps(secrets).encode(), _associated(public["signing"]))
    return json.dumps({
        "format": FORMAT,
        "version": VERSION,
        "kdf": {"name": "scrypt", "n": kdf.n, "r": kdf.r, "p": kdf.p, "salt": salt.hex()},
        "cipher": CIPHER,
        "public": public,
        "previous_public": [{**_public(r.keys), "retired_at": r.retired_at} for r in previous],
        "sealed": sealed.hex(),
    }, indent=2) + "\n"


def _write(path: Path, text: str, *, overwrite: bool) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600; refuse an existing file unless told."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if ``path`` exists
            except FileExistsError:
                raise KeystoreError(f"a keystore already exists at {path}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeystoreError(f"no keystore at {path}") from None
    except (OSError, ValueError) as e:
        raise KeystoreError(f"{path}: not a readable Destra keystore ({e})") from e
    if not isinstance(data, dict):
        raise KeystoreError(f"{path}: not a Destra keystore")
    return data


def _is_legacy(data: dict[str, Any]) -> bool:
    return "ed25519_seed" in data


def _header(path: Path, data: dict[str, Any]) -> tuple[_Kdf, bytes, bytes]:
    """(kdf parameters, salt, sealed bytes) of a version-1 keystore."""
    if data.get("format") != FORMAT:
        raise KeystoreError(f"{path}: not a Destra keystore")
    if data.get("version") != VERSION:
        raise KeystoreError(f"{path}: unsupported keystore version {data.get('version')!r}")
    try:
        kdf_data = data["kdf"]
        if kdf_data["name"] != "scrypt" or data["cipher"] != CIPHER:
            raise ValueError("unsupported kdf or cipher")
        n, r, p = int(kdf_data["n"]), int(kdf_data["r"]), int(kdf_data["p"])
        salt, sealed = bytes.fromhex(kdf_data["salt"]), bytes.fromhex(data["sealed"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # Overflow: int(Infinity)
        raise KeystoreError(f"{path}: malformed keystore ({e})") from e
    try:
        return _Kdf(n, r, p), salt, sealed
    except KeystoreError as e:
        raise KeystoreError(f"{path}: {e}") from None


def _decrypt(path: Path, data: dict[str, Any],
             passphrase: bytes) -> tuple[KeyPair, list[_Retired], _Kdf]:
    """The keys of a version-1 keystore, checked against its public header."""
    _check_passphrase(passphrase)
    kdf, salt, sealed = _header(path, data)
    corrupted = KeystoreError(f"wrong passphrase or corrupted keystore: {path}")
    try:
        key = crypto.passphrase_key(passphrase, salt, kdf.n, kdf.r, kdf.p)
        secrets = json.loads(crypto.open_sealed(key, sealed, _associated(
            str(data["public"]["signing"]))))
        current = _keypair(secrets["current"])
        previous = [_Retired(_keypair(s), int(s["retired_at"])) for s in secrets["previous"]]
        headers = [data["public"], *data.get("previous_public", [])]
    except (DecryptionFailed, KeyError, TypeError, ValueError, OverflowError) as e:
        raise corrupted from e
    expected = [_public(current), *({**_public(r.keys), "retired_at": r.retired_at}
                                    for r in previous)]
    if headers != expected:
        raise corrupted
    return current, previous, kdf


def _keypair(secret: dict[str, Any]) -> KeyPair:
    keys = KeyPair(bytes.fromhex(secret["seed"]), bytes.fromhex(secret["secret"]))
    if len(keys.signing_seed) != 32 or len(keys.encryption_secret) != 32:
        raise ValueError("keys must be 32 bytes each")
    return keys


def _ring(current: KeyPair, previous: list[_Retired]) -> Keyring:
    return Keyring(current, tuple(r.keys for r in previous))


# ---------------------------------------------------------------- API


def create(path: Path, passphrase: bytes, keys: KeyPair | None = None, *,
           n: int = SCRYPT_N) -> Keyring:
    """A new keystore at ``path`` holding ``keys`` (fresh ones by default); never overwrites."""
    _check_passphrase(passphrase)
    if path.exists():
        raise KeystoreError(f"a keystore already exists at {path}")
    current = KeyPair.generate() if keys is None else keys
    _write(path, _encode(passphrase, current, [], _Kdf(n, SCRYPT_R, SCRYPT_P)), overwrite=False)
    return Keyring(current)


def load(path: Path, passphrase: bytes, *, n: int = SCRYPT_N) -> Keyring:
    """The keys in ``path``; a legacy plaintext key file is encrypted in place (scrypt ``n``)."""
    _check_passphrase(passphrase)
    data = _read_json(path)
    if _is_legacy(data):
        try:
            keys = KeyPair.load(path)
        except ConfigError as e:
            raise KeystoreError(str(e)) from e
        _write(path, _encode(passphrase, keys, [], _Kdf(n, SCRYPT_R, SCRYPT_P)), overwrite=True)
        return Keyring(keys)
    current, previous, _ = _decrypt(path, data, passphrase)
    return _ring(current, previous)


def load_or_create(path: Path, passphrase: bytes, *, n: int = SCRYPT_N) -> Keyring:
    """The keys in ``path``, created there on first use."""
    if path.exists():
        return load(path, passphrase, n=n)
    try:
        return create(path, passphrase, n=n)
    except KeystoreError:
        if path.exists():  # another process created it first
            return load(path, passphrase, n=n)
        raise


def public_keys(path: Path) -> dict[str, Any]:
    """The public keys of ``path`` without its passphrase.

    ``signing`` and ``encryption`` (hex), ``fingerprint`` (first 16 hex digits of
    the SHA-256 of the signing key), ``previous_keys`` (how many were rotated out)
    and ``encrypted`` (False for a legacy plaintext file not yet upgraded).
    """
    data = _read_json(path)
    if _is_legacy(data):
        try:
            public = _public(KeyPair.load(path))
        except ConfigError as e:
            raise KeystoreError(str(e)) from e
        previous, encrypted = 0, False
    else:
        _header(path, data)
        try:
            public = {k: bytes.fromhex(str(data["public"][k])).hex()
                      for k in ("signing", "encryption")}
            previous = len(data.get("previous_public", []))
        except (KeyError, TypeError, ValueError) as e:
            raise KeystoreError(f"{path}: malformed keystore ({e})") from e
        encrypted = True
    return {**public, "fingerprint": fingerprint(bytes.fromhex(public["signing"])),
            "previous_keys": previous, "encrypted": encrypted}


def fingerprint(signing_public: bytes) -> str:
    """A short name for a signing key: the first 16 hex digits of its SHA-256."""
    return crypto.digest(signing_public).hex()[:16]


def rotate(path: Path, passphrase: bytes, new_passphrase: bytes | None = None) -> Keyring:
    """A fresh X25519 encryption key; the old pair is kept as the newest previous keys.

    The Ed25519 signing key stays: it is the identity the ledger binds an account to
    and the verifier binds a node id to, so changing it needs a rotation event the
    network does not have yet. Results and grants sealed to the old encryption key
    still open with ``Keyring.all()``. With ``new_passphrase`` the keystore is
    re-encrypted under it.
    """
    data = _read_json(path)
    if _is_legacy(data):
        load(path, passphrase)
        data = _read_json(path)
    current, previous, kdf = _decrypt(path, data, passphrase)
    previous = [_Retired(current, int(time.time() * 1000)), *previous]
    fresh = KeyPair(current.signing_seed, KeyPair.generate().encryption_secret)
    target = passphrase if new_passphrase is None else new_passphrase
    _write(path, _encode(target, fresh, previous, kdf), overwrite=True)
    return _ring(fresh, previous)
