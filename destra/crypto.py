"""Every cryptographic primitive Destra uses, behind one small module.

The backends are chosen here, by measurement (DESIGN.md, "Costs measured";
``bench/crypto.py`` measures them again):

* Ed25519 signatures: PyNaCl (libsodium). Verify takes about 80 us against
  140 us in pyca/cryptography and 360 us in pycryptodome, and signature checks
  sit on the verifier's hot path.
* AES-256-GCM, X25519 and HKDF-SHA256: pyca/cryptography (OpenSSL). AES-GCM of
  200 bytes takes about 1-2 us against about 80 us in pycryptodome.
* scrypt for passphrases: the standard library's ``hashlib.scrypt`` (OpenSSL).

Nothing else in the code base imports a crypto library, except
``schemas.signatures`` (below).

Confidentiality (issue 4) is envelope encryption:

* a payload is sealed under a fresh 32-byte data key with AES-256-GCM; the
  associated data binds what it is (task id, schema), so a ciphertext moved to
  another task fails to open;
* a data key is *wrapped* to one node's X25519 key: an ephemeral X25519 key
  agreement, HKDF-SHA256 into a key-encryption key, AES-GCM over the data key
  with associated data naming task, node and attempt (``wrap_key``);
* a result is sealed to the submitter's X25519 key the same way
  (``seal_to`` / ``open_sealed_to``).

Event signatures (Ed25519 over the exact bytes written) and the key pair
that makes them are ``schemas.signatures``, in the bottom layer so that every
consumer can check a signature; this module re-exports them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from destra.errors import ConfigError, DecryptionFailed
from schemas.signatures import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    KeyPair,
    sign_encoded,
    sign_event,
    signed_bytes,
    verify,
    verify_event,
)

__all__ = ["PUBLIC_KEY_BYTES", "SIGNATURE_BYTES", "KeyPair", "sign_encoded", "sign_event",
           "signed_bytes", "verify", "verify_event"]  # and the sealing functions below

T = TypeVar("T")

DATA_KEY_BYTES = 32
NONCE_BYTES = 12
_SEALED_VERSION = 1
_TAG_BYTES = 16
SEALED_OVERHEAD = 1 + NONCE_BYTES + _TAG_BYTES
"""Bytes ``seal`` adds to a plaintext: version, nonce and tag."""


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


SEAL_CHUNK_BYTES = 1 << 20
"""Plaintext encrypted at a time by ``seal_chunks``."""


def seal_chunks(key: bytes, parts: Iterable[bytes | memoryview], associated: bytes
                ) -> Iterator[bytes]:
    """``seal(key, b"".join(parts), associated)``, yielded in pieces of at most
    ``SEAL_CHUNK_BYTES`` of ciphertext: the same format, opened by ``open_sealed``.

    For a large payload going to a file (``BlobStore.put_chunks``): neither the joined
    plaintext nor the whole ciphertext is ever in memory, and the consumer can hash and
    write each piece while the next is encrypted. The GCM tag, in the last piece, is
    over the whole ciphertext, as one-shot sealing's."""
    nonce = os.urandom(NONCE_BYTES)
    encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(associated)
    yield bytes([_SEALED_VERSION]) + nonce
    for part in parts:
        view = memoryview(part).cast("B")
        for at in range(0, len(view), SEAL_CHUNK_BYTES):
            yield encryptor.update(view[at:at + SEAL_CHUNK_BYTES])
    yield encryptor.finalize() + encryptor.tag


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of ``seal``; ``DecryptionFailed`` for a wrong key, data or tampering."""
    if len(sealed) < 1 + NONCE_BYTES + _TAG_BYTES or sealed[0] != _SEALED_VERSION:
        raise DecryptionFailed("not a sealed Destra ciphertext (bad length or version)")
    if len(key) != DATA_KEY_BYTES:
        raise DecryptionFailed(f"key must be {DATA_KEY_BYTES} bytes")
    try:
        view = memoryview(sealed)  # no copy of the ciphertext (tens of MB for a program)
        return AESGCM(key).decrypt(view[1:1 + NONCE_BYTES], view[1 + NONCE_BYTES:],
                                   associated)
    except InvalidTag:
        raise DecryptionFailed(
            "authentication failed: wrong key, wrong context or tampered ciphertext") from None


def open_sealed_in_parts(key: bytes, sealed: bytes, associated: bytes,
                         parse: Callable[[Callable[[int], bytes]], T]) -> T:
    """What ``parse`` makes of ``seal``'s plaintext, read in pieces: ``parse(read)`` calls
    ``read(n)`` for the next ``n`` bytes (fewer at the end; ``n`` < 0: the rest), each
    decrypted on demand into its own ``bytes``. For a framed task input, each large
    value opens as one object of its own, without a copy out of the whole plaintext
    (24 ms for a 48 MiB input here).

    Nothing ``parse`` returns is given out unless the tag over the whole ciphertext
    verifies, which needs all of it read: ``DecryptionFailed`` otherwise, and before
    any error ``parse`` raised (it read unauthenticated bytes), which is raised only
    for an authentic ciphertext. ``parse`` must read it all (``ValueError`` if not)."""
    if len(sealed) < SEALED_OVERHEAD or sealed[0] != _SEALED_VERSION:
        raise DecryptionFailed("not a sealed Destra ciphertext (bad length or version)")
    if len(key) != DATA_KEY_BYTES:
        raise DecryptionFailed(f"key must be {DATA_KEY_BYTES} bytes")
    view = memoryview(sealed)
    end = len(view) - _TAG_BYTES
    decryptor = Cipher(algorithms.AES(key), modes.GCM(bytes(view[1:1 + NONCE_BYTES]))
                       ).decryptor()
    decryptor.authenticate_additional_data(associated)
    at = 1 + NONCE_BYTES

    def read(n: int) -> bytes:
        nonlocal at
        stop = end if n < 0 else min(end, at + n)
        piece = decryptor.update(view[at:stop])
        at = stop
        return piece

    try:
        made = parse(read)
        if at != end:
            raise ValueError(f"{end - at} bytes of plaintext left unread")
    except Exception:
        for start in range(at, end, SEAL_CHUNK_BYTES):  # authenticate the rest first
            decryptor.update(view[start:min(end, start + SEAL_CHUNK_BYTES)])
        _finish(decryptor, view[end:])
        raise
    _finish(decryptor, view[end:])
    return made


def _finish(decryptor: Any, tag: memoryview) -> None:
    try:
        decryptor.finalize_with_tag(bytes(tag))
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


def grant_key(keys: KeyPair, ephemeral_public: bytes) -> bytes:
    """The key-encryption key of a grant to ``keys`` (``wrap_key``): it opens that grant's
    wrapped key and nothing else, so a node may show it (``DataKeyRefused``)."""
    return _recover(keys, ephemeral_public, b"grant")


def unwrap_with(grant_kek: bytes, wrapped: bytes, associated: bytes) -> bytes:
    """The data key a grant wraps, opened with its key-encryption key (``grant_key``);
    ``DecryptionFailed`` when that key does not open it."""
    if len(grant_kek) != DATA_KEY_BYTES:
        raise DecryptionFailed("a grant key is 32 bytes")
    data_key = open_sealed(grant_kek, wrapped, associated)
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
