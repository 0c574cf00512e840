"""Every cryptographic primitive Destra uses, behind one small module.

The backends are chosen here, by measurement (DESIGN.md, "Costs measured";
``bench/crypto.py`` measures them again):

* Ed25519 signatures: PyNaCl (libsodium). Verify takes about 80 us against
  140 us in pyca/cryptography and 360 us in pycryptodome, and signature checks
  sit on the verifier's hot path.
* AES-256-GCM, X25519 and HKDF-SHA256: pyca/cryptography (OpenSSL). AES-GCM of
  200 bytes takes about 1-2 us against about 80 us in pycryptodome.
* scrypt for passphrases: the standard library's ``hashlib.scrypt`` (OpenSSL).

Nothing else in the code base imports a crypto library.

Confidentiality (issue 4) is envelope encryption:

* a payload is sealed under a fresh 32-byte data key with AES-256-GCM; the
  associated data binds what it is (task id, schema), so a ciphertext moved to
  another task fails to open;
* a data key is *wrapped* to one node's X25519 key: an ephemeral X25519 key
  agreement, HKDF-SHA256 into a key-encryption key, AES-GCM over the data key
  with associated data naming task, node and attempt (``wrap_key``);
* a result is sealed to the submitter's X25519 key the same way
  (``seal_to`` / ``open_sealed_to``).

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

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

from destra.errors import ConfigError, DecryptionFailed, DestraError
from schemas import Event
from schemas.codec import encode_unchecked, unsigned_bytes, with_signature

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
DATA_KEY_BYTES = 32
NONCE_BYTES = 12
_SEALED_VERSION = 1
_TAG_BYTES = 16


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
        return bytes(SigningKey(self.signing_seed).verify_key)

    @property
    def encryption_public(self) -> bytes:
        """The X25519 public key others encrypt to (32 bytes)."""
        return bytes(PrivateKey(self.encryption_secret).public_key)

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature of ``message``."""
        return SigningKey(self.signing_seed).sign(message).signature

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


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError):
        return False
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
    try:
        message = signed_bytes(event)
    except DestraError:
        return False  # raw bytes whose envelope does not parse: nothing was signed
    return verify(public_key, message, signature)


# ---------------------------------------------------------------- symmetric sealing


def new_data_key() -> bytes:
    """A fresh random 256-bit AES key."""
    return os.urandom(DATA_KEY_BYTES)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: ``version (1) | nonce (12) | ciphertext | tag (16)``.

    The nonce is random: 96 random bits are safe for far more messages than one
    data key ever seals (a data key seals one payload).
    """
    nonce = os.urandom(NONCE_BYTES)
    return bytes([_SEALED_VERSION]) + nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of ``seal``; ``DecryptionFailed`` for a wrong key, data or tampering."""
    if len(sealed) < 1 + NONCE_BYTES + _TAG_BYTES or sealed[0] != _SEALED_VERSION:
        raise DecryptionFailed("not a sealed Destra ciphertext (bad length or version)")
    if len(key) != DATA_KEY_BYTES:
        raise DecryptionFailed(f"key must be {DATA_KEY_BYTES} bytes")
    try:
        return AESGCM(key).decrypt(sealed[1:1 + NONCE_BYTES], sealed[1 + NONCE_BYTES:],
                                   associated)
    except InvalidTag:
        raise DecryptionFailed(
            "authentication failed: wrong key, wrong context or tampered ciphertext") from None


# ---------------------------------------------------------------- public-key sealing


def _kek(shared: bytes, ephemeral_public: bytes, recipient_public: bytes, purpose: bytes) -> bytes:
    """Key-encryption key from an X25519 shared secret, bound to both public keys."""
    return HKDF(algorithm=hashes.SHA256(), length=DATA_KEY_BYTES, salt=None,
                info=b"destra/" + purpose + b"/v1" + ephemeral_public + recipient_public,
                ).derive(shared)


def _agree(recipient_public: bytes, purpose: bytes) -> tuple[bytes, bytes]:
    """(ephemeral public key, key-encryption key) for a message to ``recipient_public``."""
    if len(recipient_public) != PUBLIC_KEY_BYTES:
        raise DecryptionFailed(f"recipient key must be {PUBLIC_KEY_BYTES} bytes")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    return ephemeral_public, _kek(shared, ephemeral_public, recipient_public, purpose)


def _recover(keys: KeyPair, ephemeral_public: bytes, purpose: bytes) -> bytes:
    """The key-encryption key ``_agree`` derived, from the recipient's side."""
    if len(ephemeral_public) != PUBLIC_KEY_BYTES:
        raise DecryptionFailed(f"ephemeral key must be {PUBLIC_KEY_BYTES} bytes")
    secret = X25519PrivateKey.from_private_bytes(keys.encryption_secret)
    try:
        shared = secret.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError:  # an all-zero shared secret: a low-order point was sent
        raise DecryptionFailed("ephemeral key is a low-order point") from None
    return _kek(shared, ephemeral_public, keys.encryption_public, purpose)


def wrap_key(data_key: bytes, recipient_public: bytes, associated: bytes) -> tuple[bytes, bytes]:
    """``(ephemeral_public, wrapped)``: ``data_key`` readable only with the recipient's secret."""
    ephemeral_public, kek = _agree(recipient_public, b"grant")
    return ephemeral_public, seal(kek, data_key, associated)


def unwrap_key(keys: KeyPair, ephemeral_public: bytes, wrapped: bytes, associated: bytes) -> bytes:
    """The data key ``wrap_key`` wrapped to ``keys``; ``DecryptionFailed`` otherwise."""
    data_key = open_sealed(_recover(keys, ephemeral_public, b"grant"), wrapped, associated)
    if len(data_key) != DATA_KEY_BYTES:
        raise DecryptionFailed("unwrapped data key has the wrong length")
    return data_key


def seal_to(recipient_public: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """``ephemeral_public (32) | seal(...)``: ``plaintext`` for the recipient only."""
    ephemeral_public, kek = _agree(recipient_public, b"sealed-box")
    return ephemeral_public + seal(kek, plaintext, associated)


def open_sealed_to(keys: KeyPair, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of ``seal_to``; ``DecryptionFailed`` if it is not for ``keys``."""
    if len(sealed) < PUBLIC_KEY_BYTES:
        raise DecryptionFailed("sealed message too short")
    kek = _recover(keys, sealed[:PUBLIC_KEY_BYTES], b"sealed-box")
    return open_sealed(kek, sealed[PUBLIC_KEY_BYTES:], associated)


def digest(data: bytes) -> bytes:
    """SHA-256, the content address of blobs and the digest results are compared by."""
    return hashlib.sha256(data).digest()


# ---------------------------------------------------------------- passphrases


SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1


def passphrase_key(passphrase: bytes, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R,
                   p: int = SCRYPT_P) -> bytes:
    """A 256-bit key from a passphrase: scrypt (about 0.1 s and 32 MiB at the defaults)."""
    if not passphrase:
        raise ConfigError("an empty passphrase is not allowed")
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=256 * 2**20,
                          dklen=DATA_KEY_BYTES)


def associated_data(purpose: str, *parts: str | int) -> bytes:
    """Associated data naming what a ciphertext is: ``destra/<purpose>\0part\0part...``."""
    return "\0".join(["destra/" + purpose, *map(str, parts)]).encode()
