"""Ed25519 event signatures and the key pair that makes them.

In the bottom layer so that every consumer (the services, the node runner,
the shared consumer paths) can check a signature; ``destra.crypto`` re-exports
all of it. The backend is PyNaCl (libsodium): verify takes about 80 us against
140 us in pyca/cryptography (DESIGN.md, "Costs measured").

Events are signed over the exact bytes written, never a re-encoding (Avro
leaves map order and block layout to the writer, and an event written under
an older schema version must still verify after it is read with the current
one). The rule, for a verifier in any language (Ed25519, RFC 8032):

* the message is the record's single-object encoding exactly as written, the
  marker ``C3 01`` and the writer schema's 8-byte fingerprint included;
* except the envelope's ``signature`` union, which is replaced by its null
  branch, the single byte ``0x00``. The envelope is the first field of every
  event schema and opens with ``event_id`` (string), ``occurred_at`` (long),
  ``producer_id`` (string), then ``signature`` (union [null, bytes]): skip two
  zig-zag-varint-length-prefixed strings and one zig-zag varint after the
  10-byte header, and the union starts there (``0x00``, or ``0x02``, a
  zig-zag varint length and the 64 signature bytes);
* everything else, ``signer`` included, is covered as written.

A writer encodes the event with ``signature`` null and ``signer`` set, signs
those bytes, and writes the same bytes with ``0x02 0x80 0x01`` and the 64-byte
signature in place of the ``0x00`` (``sign_encoded``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

from schemas.codec import encode_unchecked, unsigned_bytes, with_signature
from schemas.errors import ConfigError
from schemas.events import Event

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


@dataclass(frozen=True)
class KeyPair:
    """An identity: an Ed25519 signing key and an X25519 encryption key."""

    signing_seed: bytes
    encryption_secret: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """Fresh random keys."""
        return cls(bytes(SigningKey.generate()), bytes(PrivateKey.generate()))

    @property
    def signing_public(self) -> bytes:
        """The Ed25519 public key others verify with (32 bytes)."""
        return bytes(self._signing_key.verify_key)

    @property
    def encryption_public(self) -> bytes:
        """The X25519 public key others encrypt to (32 bytes)."""
        return bytes(PrivateKey(self.encryption_secret).public_key)

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature of ``message``."""
        return self._signing_key.sign(message).signature

    @functools.cached_property
    def _signing_key(self) -> SigningKey:
        # Built once: deriving the Ed25519 key from its seed is most of a signature's cost.
        return SigningKey(self.signing_seed)

    def save(self, path: Path) -> None:
        """Write the keys to ``path``, readable by the owner only.

        Plain hex in a 0600 file for now; the passphrase-encrypted keystore
        (scrypt + AES-GCM) is issue 4's.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"ed25519_seed": self.signing_seed.hex(),
                           "x25519_secret": self.encryption_secret.hex()})
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> KeyPair:
        """Keys written by ``save``; ``ConfigError`` if the file is not a key file."""
        try:
            data = json.loads(path.read_text())
            keys = cls(bytes.fromhex(data["ed25519_seed"]), bytes.fromhex(data["x25519_secret"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a readable Destra key file ({e})") from e
        if len(keys.signing_seed) != 32 or len(keys.encryption_secret) != 32:
            raise ConfigError(f"{path}: keys must be 32 bytes each")
        return keys

    @classmethod
    def load_or_create(cls, path: Path) -> KeyPair:
        """The keys in ``path``, generated and saved there on first use."""
        if path.exists():
            return cls.load(path)
        keys = cls.generate()
        keys.save(path)
        return keys


_VERIFIED: dict[tuple[bytes, bytes, bytes], None] = {}
"""Recently verified (key, signature, SHA-256 of message): one process reads the same
signed event in several places (the authority check, the allocator, the verifier), and
an Ed25519 check costs ~100 us against ~1 us for the hash."""
_VERIFIED_MAX = 16_384
_VERIFIED_LOCK = threading.Lock()


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    seen = (public_key, signature, hashlib.sha256(message).digest())
    if seen in _VERIFIED:
        return True
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError):
        return False
    with _VERIFIED_LOCK:
        _VERIFIED[seen] = None
        if len(_VERIFIED) > _VERIFIED_MAX:
            del _VERIFIED[next(iter(_VERIFIED))]
    return True


def signed_bytes(event: Event) -> bytes:
    """What a signature of ``event`` covers (module docstring): the bytes it was decoded
    from with the signature union null, or, for an event built here, its encoding with
    ``signature`` null (the bytes ``encode`` will write, less the signature)."""
    if event.raw is not None:
        return unsigned_bytes(event.raw)
    return encode_unchecked(event.with_envelope(signature=None))


def sign_event(event: Event, keys: KeyPair, signer: str) -> Event:
    """``event`` signed by ``keys`` as ``signer`` (a node, account or service role)."""
    unsigned = event.with_envelope(signature=None, signer=signer)
    return unsigned.with_envelope(signature=keys.sign(signed_bytes(unsigned)))


def sign_encoded(data: bytes, keys: KeyPair) -> bytes:
    """Sign already encoded event bytes (``signer`` set by the writer); the bytes to send.

    For writers that encode themselves (another library, an older schema version).
    """
    return with_signature(data, keys.sign(unsigned_bytes(data)))


def verify_event(event: Event, public_key: bytes, signer: str | None = None) -> bool:
    """Whether ``event`` carries a valid signature by ``public_key`` (and by ``signer``).

    A decoded event is checked over the bytes it was written as (``event.raw``).
    """
    signature = event.signature
    if signature is None or event.signer is None:
        return False
    if signer is not None and event.signer != signer:
        return False
    return verify(public_key, signed_bytes(event), signature)
