"""A secret, stake-weighted ballot, tallied under Paillier homomorphic encryption.

Each voter publishes ONE Paillier ciphertext ``c = Enc(B**k)``, ``B = 2**SLOT_BITS``,
``k`` = 0 for YES, 1 for NO, 2 for ABSTAIN, with a zero-knowledge proof that ``c``
encrypts one of those three values and nothing else. Anyone holding the public key
checks the proof; the tallier raises each ciphertext to the voter's public stake and
multiplies them, ``prod(c_i ** w_i) = Enc(sum w_i * B**k_i)``, so the three stake sums
sit in three 64-bit slots of one plaintext. Only that product is ever decrypted, by
all the trustees together. The sum of all weights must stay below ``B`` (2**64
micro-tokens, 1.8e13 tokens): a slot that passes it carries into the next one, and
only a carry out of the top slot can be seen when decrypting.

Library, by measurement (``bench/ballot.py``, 2048-bit n, this shared 2-core box; the
run is ``bench/results/ballot-10k.txt``): ``phe`` (python-paillier 1.5.0) over ``gmpy2``
2.3.2. Per call, phe against lightphe 0.0.27: keygen 79 / 89 ms, encrypt 13.3 / 81 ms,
add 0.007 / 0.034 ms, multiply by a 40-bit stake 0.21 / 2.0 ms, decrypt 2.5 / 77 ms
(phe decrypts by CRT; lightphe uses Python's ``pow`` and recomputes mu every time).
lightphe would be refused even if it were faster: it draws its primes and every
encryption nonce from ``random`` (Mersenne Twister, whose state can be rebuilt from its
outputs), and takes p and q anywhere in [200, 2**(bits/2)), so n has no fixed size and
nothing excludes p = q. From phe only keygen (primes from ``random.SystemRandom``,
``gmpy2.next_prime``) and encryption are used; the proofs, tally and shares are
arithmetic on plain ints through ``gmpy2.powmod``: 9.3 ms for c**n mod n**2 at 2048
bits against 78 ms with Python's ``pow`` (8.4x), and a ballot takes four of them to cast,
three to check. 10,000 voters, measured whole (load average 4.5 on 2 cores): cast 56 ms
a ballot (voters' own machines), check 28 ms (281 s for all), accumulate 0.21 ms (2.1 s
for all), each trustee's partial decryption 17 ms, combine 0.06 ms; a ballot is 2,885
bytes.

Validity proof (Baudron, Fouque, Pointcheval, Poupard, Stern 2001; Damgard-Jurik
2001, "1-out-of-L"): ``c`` encrypts ``m_j`` exactly when ``u_j = c * g**(-m_j)`` is an
n-th power mod n**2 (g = n + 1). The prover answers the real branch (Schnorr-like
proof of knowledge of ``r`` with ``u_j = r**n``) and simulates the two others; the
three challenges must sum, mod 2**128, to SHA-256 over a domain tag, the caller's
``context`` (network, proposal, voter), the public key, ``c`` and the three
commitments. So a ballot copied to another voter or proposal fails, and a ballot for
any other value (Enc(2), Enc(B**3)) has no proof. Soundness needs the challenge space
(2**128) below the smallest prime factor of n (>= 2**255 for the smallest key
accepted, 512 bits; 2**1023 at 2048 bits).

Key splitting (n-of-n): the decryption exponent ``d`` (d = 0 mod lambda, d = 1 mod n,
so ``c**d = 1 + m*n mod n**2``) is cut into ``k`` additive integer shares: k - 1 of
them uniform in [0, 2**(bits(n*lambda) + 128)), the last ``d`` minus their sum
(negative, and applied through the inverse of c). Any k - 1 shares are then within
statistical distance 2**-128 of values independent of ``d``. Each trustee computes
``c**d_i mod n**2``; the product of all k partials is ``c**d``.

What each party can learn:

* Whoever holds every share (or ``d``, or the factors of n, e.g. the machine that ran
  ``generate_tally_key``) can decrypt every individual ballot and learn every vote.
  Keygen must run on a trusted machine that hands out the shares and forgets ``d``
  and the primes; no distributed keygen is done here.
* One trustee, or any k - 1 of them, learns nothing about a ballot.
* This is n-of-n, not t-of-n: one missing or unwilling trustee blocks the tally.
* Partial decryptions carry no proof of correctness: a cheating trustee can multiply
  its partial by ``(1 + n)**delta`` and shift the decrypted sums by ``delta``
  undetected. The next step is a Shoup / Damgard-Jurik threshold scheme (shares of
  d over a safe-prime modulus, public verification keys, an equality-of-discrete-logs
  proof with each partial, t-of-n by Shamir sharing); it needs safe-prime keygen
  (minutes per key in Python at 2048 bits) and about twice this module's code, so it
  is left for its own change.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gmpy2
from phe import paillier

from schemas.errors import DestraError

CHOICES: tuple[str, ...] = ("YES", "NO", "ABSTAIN")
SLOT_BITS = 64
SLOT = 1 << SLOT_BITS
"""B: each choice's sum lives in one slot of SLOT_BITS bits of the plaintext."""
MESSAGES: tuple[int, ...] = tuple(SLOT**k for k in range(len(CHOICES)))
"""The plaintext of each choice, B**k, in CHOICES order."""
CHALLENGE_BITS = 128
"""t: the Fiat-Shamir challenge space is 2**t; a cheating prover wins with odds 2**-t."""
MIN_KEY_BITS = 512
"""Smaller keys have prime factors under the challenge space (proofs unsound); 2048 to use."""
SHARE_SLACK_BITS = 128
"""Statistical hiding of the key shares: they exceed the secret exponent by this many bits."""

_BALLOT_VERSION = 1
_KEY_VERSION = 1
_DOMAIN = b"destra.governance.ballot.v1"
_SHARE_KIND = "destra-tally-key-share"
_PROOF_VALUES = 3 * len(CHOICES)  # a, e, z per choice


class InvalidBallot(DestraError, ValueError):
    """A ballot that must not be counted; the message starts with a kebab-case code
    (``malformed-ballot``, ``invalid-ciphertext``, ``bad-proof``) so it can be logged
    and counted by reason."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


@dataclass(frozen=True)
class TallyPublicKey:
    """The proposal's public tally key: the Paillier modulus n (g = n + 1), and how many
    trustee shares its decryption exponent was cut into, when known."""

    n: int
    """The modulus, a product of two primes of equal size; the ciphertexts live mod n**2."""
    shares: int | None = None
    """How many partial decryptions ``combine`` needs; None when the holder only checks
    ballots and does not know (``combine`` then relies on the algebraic check alone)."""

    def __post_init__(self) -> None:
        if self.n.bit_length() < MIN_KEY_BITS or self.n % 2 == 0:
            raise ValueError(f"a tally key needs an odd modulus of >= {MIN_KEY_BITS} bits")
        if self.shares is not None and not 1 <= self.shares <= 255:
            raise ValueError("a tally key has 1 to 255 shares")

    @property
    def n2(self) -> int:
        """n**2, the ciphertext modulus."""
        return self.n * self.n

    def to_bytes(self) -> bytes:
        """A version byte, the share count (0: unknown), then n big-endian."""
        return bytes([_KEY_VERSION, self.shares or 0]) + _int_bytes(self.n)

    @classmethod
    def from_bytes(cls, data: bytes) -> TallyPublicKey:
        """The key ``to_bytes`` wrote; ValueError on anything else."""
        if len(data) < 3 or data[0] != _KEY_VERSION or data[2] == 0:
            raise ValueError("not a tally public key (version 1, canonical n)")
        return cls(int.from_bytes(data[2:], "big"), data[1] or None)

    def fingerprint(self) -> str:
        """A short id for logs and share files: 16 hex digits of SHA-256 over n alone, so
        the same key has one id whether or not its share count is written."""
        return hashlib.sha256(_DOMAIN + _int_bytes(self.n)).hexdigest()[:16]


@dataclass(frozen=True)
class TallyKeyShare:
    """One trustee's additive share of the decryption exponent; secret, one 0600 file."""

    index: int
    """1-based position among the shares (informational: all are needed, in any order)."""
    count: int
    """How many shares the key was cut into; the tally needs all of them."""
    n: int
    """The public modulus the share belongs to."""
    exponent: int = field(repr=False)
    """d_i, kept out of repr (and so out of logs); the last share is usually negative.
    The sum of all shares is d."""

    def to_json(self) -> str:
        """The share as JSON; ints as decimal strings (JSON readers differ on big ints)."""
        return json.dumps({
            "kind": _SHARE_KIND, "version": 1, "index": self.index, "count": self.count,
            "key": TallyPublicKey(self.n).fingerprint(),
            "n": str(self.n), "exponent": str(self.exponent),
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TallyKeyShare:
        """The share ``to_json`` wrote; ValueError if it is not one or does not match n."""
        try:
            raw: Any = json.loads(text)
            if raw["kind"] != _SHARE_KIND or raw["version"] != 1:
                raise ValueError("not a tally key share (version 1)")
            share = cls(int(raw["index"]), int(raw["count"]), int(raw["n"]),
                        int(raw["exponent"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed tally key share: {e!r}") from e
        if raw["key"] != TallyPublicKey(share.n).fingerprint():
            raise ValueError("tally key share: fingerprint does not match n")
        if not 1 <= share.index <= share.count:
            raise ValueError("tally key share: index out of 1..count")
        return share


def generate_tally_key(bits: int = 2048,
                       shares: int = 3) -> tuple[TallyPublicKey, list[TallyKeyShare]]:
    """A fresh key and its ``shares`` additive shares. The primes and d are dropped on
    return; whoever ran this must be trusted not to have kept them."""
    if bits < MIN_KEY_BITS:
        raise ValueError(f"tally keys need >= {MIN_KEY_BITS} bits")
    if not 1 <= shares <= 255:
        raise ValueError("a tally key has 1 to 255 shares")
    while True:
        public, private = paillier.generate_paillier_keypair(n_length=bits)
        n, p, q = int(public.n), int(private.p), int(private.q)
        lam = math.lcm(p - 1, q - 1)
        if math.gcd(lam, n) == 1:  # always, for primes of equal size; checked anyway
            break
    d = lam * pow(lam, -1, n)  # 0 mod lambda, 1 mod n
    bound = 1 << ((n * lam).bit_length() + SHARE_SLACK_BITS)
    parts = [secrets.randbelow(bound) for _ in range(shares - 1)]
    parts.append(d - sum(parts))
    key = TallyPublicKey(n, shares)
    return key, [TallyKeyShare(i + 1, shares, n, e) for i, e in enumerate(parts)]


def cast(key: TallyPublicKey, choice: str, context: bytes) -> bytes:
    """The serialized ballot for ``choice``: its ciphertext and proof of validity, bound
    to ``context`` (network, proposal id, voter id), about 2.9 KB at 2048 bits."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, not {choice!r}")
    real = CHOICES.index(choice)
    n, n2 = key.n, key.n2
    r = _unit(n)
    c = int(paillier.PaillierPublicKey(n).raw_encrypt(MESSAGES[real], r_value=r))
    a = [0] * len(CHOICES)
    e = [0] * len(CHOICES)
    z = [0] * len(CHOICES)
    for k in range(len(CHOICES)):
        if k != real:  # simulated: pick the answer and challenge, solve for the commitment
            e[k] = secrets.randbelow(1 << CHALLENGE_BITS)
            z[k] = _unit(n)
            a[k] = _powmod(z[k], n, n2) * _powmod(_shift(key, c, k), -e[k], n2) % n2
    rho = _unit(n)
    a[real] = _powmod(rho, n, n2)
    challenge = _challenge(key, context, c, a)
    e[real] = (challenge - sum(e)) % (1 << CHALLENGE_BITS)
    z[real] = rho * _powmod(r, e[real], n) % n
    return bytes([_BALLOT_VERSION]) + b"".join(_field(v) for v in [c, *a, *e, *z])


def check_ballot(key: TallyPublicKey, ballot: bytes, context: bytes) -> int:
    """The ballot's ciphertext if it is well formed and its proof holds for ``context``;
    InvalidBallot with the reason otherwise."""
    values = _parse(ballot)
    n, n2 = key.n, key.n2
    c, a, e, z = values[0], values[1:4], values[4:7], values[7:10]
    _check_unit(c, n, n2, "invalid-ciphertext", "ciphertext")
    for k in range(len(CHOICES)):
        _check_unit(a[k], n, n2, "bad-proof", f"commitment {k}")
        _check_unit(z[k], n, n, "bad-proof", f"response {k}")
        if e[k] >= 1 << CHALLENGE_BITS:
            raise InvalidBallot("bad-proof", f"challenge {k} out of range")
    if sum(e) % (1 << CHALLENGE_BITS) != _challenge(key, context, c, a):
        raise InvalidBallot("bad-proof", "challenges do not match the hash (other context?)")
    for k in range(len(CHOICES)):
        if _powmod(z[k], n, n2) != a[k] * _powmod(_shift(key, c, k), e[k], n2) % n2:
            raise InvalidBallot("bad-proof", f"branch {k} does not verify")
    return c


def accumulate(key: TallyPublicKey, total: int | None, ciphertext: int, weight: int) -> int:
    """The running tally with one more ballot: ``total * ciphertext**weight mod n**2``
    (``total`` None is Enc(0) = 1). The weights' sum must stay below 2**SLOT_BITS."""
    n2 = key.n2
    if not 0 <= weight < SLOT:
        raise ValueError(f"weight {weight} outside [0, 2**{SLOT_BITS})")
    if not 0 < ciphertext < n2 or (total is not None and not 0 < total < n2):
        raise ValueError("ciphertext outside (0, n**2)")
    return (1 if total is None else total) * _powmod(ciphertext, weight, n2) % n2


def partial_decrypt(share: TallyKeyShare, ciphertext: int) -> int:
    """One trustee's part of the decryption of the tally: ``ciphertext**d_i mod n**2``."""
    n2 = share.n * share.n
    if not 0 < ciphertext < n2 or math.gcd(ciphertext, share.n) != 1:
        raise ValueError("ciphertext outside (0, n**2) or not a unit")
    return _powmod(ciphertext, share.exponent, n2)


def combine(key: TallyPublicKey, partials: Sequence[int]) -> tuple[int, int, int]:
    """The sums (yes, no, abstain) from every trustee's partial decryption. ValueError
    if partials are missing, do not combine to a Paillier plaintext, or overflow."""
    count = _share_count(key, partials)
    n, n2 = key.n, key.n2
    x = 1
    for p in partials:
        if not 0 < p < n2:
            raise ValueError("partial decryption outside (0, n**2)")
        x = x * p % n2
    if x % n != 1:
        raise ValueError(f"the {count} partials do not combine to a plaintext "
                         "(a share missing, wrong or from another key)")
    m = (x - 1) // n
    if m >> (SLOT_BITS * len(CHOICES)):
        raise ValueError("tally overflows its slots (total weight >= 2**64?)")
    yes, no, abstain = ((m >> (SLOT_BITS * k)) & (SLOT - 1) for k in range(len(CHOICES)))
    return yes, no, abstain


def decrypt_sums(key: TallyPublicKey, shares: Sequence[TallyKeyShare],
                 ciphertext: int) -> tuple[int, int, int]:
    """Every trustee's partial, combined (for tests and a single operator's tools)."""
    if any(s.n != key.n for s in shares):
        raise ValueError("a share belongs to another key")
    if len({s.count for s in shares}) > 1:
        raise ValueError("shares from different splits")
    return combine(key, [partial_decrypt(s, ciphertext) for s in shares])


def _share_count(key: TallyPublicKey, partials: Sequence[int]) -> int:
    """The number of partials, checked against the key's share count when it is known.

    Without it, a missing share still shows: the product is then not 1 mod n, except
    with odds about 1/p.
    """
    if not partials:
        raise ValueError("no partial decryptions")
    if key.shares is not None and len(partials) != key.shares:
        raise ValueError(f"{len(partials)} partial decryptions for a key cut into "
                         f"{key.shares} shares: every trustee is needed")
    return len(partials)


def _powmod(base: int, exponent: int, modulus: int) -> int:
    return int(gmpy2.powmod(base, exponent, modulus))


def _unit(n: int) -> int:
    """A uniform random unit mod n (drawing a non-unit would factor n: never in practice)."""
    while True:
        r = secrets.randbelow(n - 1) + 1
        if math.gcd(r, n) == 1:
            return r


def _shift(key: TallyPublicKey, c: int, k: int) -> int:
    """u_k = c * g**(-m_k) mod n**2, an n-th power iff c encrypts m_k; g**-m = 1 - m*n."""
    return c * (1 - MESSAGES[k] * key.n) % key.n2


def _challenge(key: TallyPublicKey, context: bytes, c: int, a: Sequence[int]) -> int:
    """The Fiat-Shamir challenge: SHA-256 over the domain, context, key, c and commitments,
    every item length-prefixed so no two inputs hash the same bytes."""
    h = hashlib.sha256(_DOMAIN)
    for item in [context, _int_bytes(key.n), _int_bytes(c), *(_int_bytes(v) for v in a)]:
        h.update(len(item).to_bytes(4, "big"))
        h.update(item)
    return int.from_bytes(h.digest(), "big") % (1 << CHALLENGE_BITS)


def _check_unit(v: int, n: int, modulus: int, code: str, what: str) -> None:
    if not 0 < v < modulus:
        raise InvalidBallot(code, f"{what} outside (0, {'n' if modulus == n else 'n**2'})")
    if math.gcd(v, n) != 1:
        raise InvalidBallot(code, f"{what} shares a factor with n")


def _int_bytes(v: int) -> bytes:
    return v.to_bytes(max(1, (v.bit_length() + 7) // 8), "big")


def _field(v: int) -> bytes:
    raw = _int_bytes(v)
    return len(raw).to_bytes(2, "big") + raw


def _parse(ballot: bytes) -> list[int]:
    """The ten ints of a ballot (c, a0-a2, e0-e2, z0-z2), each a 2-byte length then the
    int big-endian in that many bytes, no leading zero byte: one encoding per ballot."""
    if not isinstance(ballot, bytes | bytearray) or not ballot:
        raise InvalidBallot("malformed-ballot", "empty or not bytes")
    if ballot[0] != _BALLOT_VERSION:
        raise InvalidBallot("malformed-ballot", f"unknown version {ballot[0]}")
    values, at = [], 1
    for i in range(1 + _PROOF_VALUES):
        if at + 2 > len(ballot):
            raise InvalidBallot("malformed-ballot", f"truncated at field {i}")
        size = int.from_bytes(ballot[at:at + 2], "big")
        raw = ballot[at + 2:at + 2 + size]
        if size == 0 or len(raw) != size:
            raise InvalidBallot("malformed-ballot", f"field {i} empty or truncated")
        if size > 1 and raw[0] == 0:
            raise InvalidBallot("malformed-ballot", f"field {i} not canonical (leading zero)")
        values.append(int.from_bytes(raw, "big"))
        at += 2 + size
    if at != len(ballot):
        raise InvalidBallot("malformed-ballot", f"{len(ballot) - at} trailing bytes")
    return values
