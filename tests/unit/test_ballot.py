"""The secret ballot (governance.ballot): tallies add up, and nothing else gets counted.

One 1024-bit key for the module (a 2048-bit key behaves the same, four times slower).
"""

from __future__ import annotations

import json
import math
import random
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from governance.ballot import (
    CHOICES,
    MESSAGES,
    SLOT,
    SLOT_BITS,
    InvalidBallot,
    TallyKeyShare,
    TallyPublicKey,
    _challenge,
    _field,
    _parse,
    _powmod,
    _shift,
    accumulate,
    cast,
    check_ballot,
    combine,
    decrypt_sums,
    generate_tally_key,
    partial_decrypt,
)

CONTEXT = b"destra-test/proposal-7/voter-alice"

KEY, SHARES = generate_tally_key(bits=1024, shares=3)


def _refused(code: str, ballot: bytes, context: bytes = CONTEXT) -> InvalidBallot:
    with pytest.raises(InvalidBallot) as caught:
        check_ballot(KEY, ballot, context)
    assert caught.value.code == code and str(caught.value).startswith(code + ": ")
    return caught.value


def _encode(values: list[int]) -> bytes:
    return bytes([1]) + b"".join(_field(v) for v in values)


def _forged(plaintext: int, claim: int) -> bytes:
    """Enc(plaintext) with a proof built as an honest prover for ``CHOICES[claim]`` would
    build it, knowing r: the real branch is answered for the wrong plaintext."""
    n, n2 = KEY.n, KEY.n2
    r = secrets.randbelow(n - 2) + 2
    c = (1 + plaintext * n) * _powmod(r, n, n2) % n2
    a, e, z = [0] * 3, [0] * 3, [0] * 3
    for k in range(3):
        if k != claim:
            e[k] = secrets.randbelow(1 << 128)
            z[k] = secrets.randbelow(n - 2) + 2
            a[k] = _powmod(z[k], n, n2) * _powmod(_shift(KEY, c, k), -e[k], n2) % n2
    rho = secrets.randbelow(n - 2) + 2
    a[claim] = _powmod(rho, n, n2)
    e[claim] = (_challenge(KEY, CONTEXT, c, a) - sum(e)) % (1 << 128)
    z[claim] = rho * _powmod(r, e[claim], n) % n
    return _encode([c, *a, *e, *z])


def test_a_weighted_tally_of_random_ballots_decrypts_to_the_plain_sums() -> None:
    rng = random.Random(7)
    plain = [0, 0, 0]
    total = None
    for voter in range(60):
        choice = rng.choice(CHOICES)
        weight = rng.randrange(0, 10**12)  # up to a million tokens, in micro-tokens
        context = b"proposal-7/voter-%d" % voter
        c = check_ballot(KEY, cast(KEY, choice, context), context)
        total = accumulate(KEY, total, c, weight)
        plain[CHOICES.index(choice)] += weight
    assert total is not None
    assert decrypt_sums(KEY, SHARES, total) == tuple(plain)


def test_an_empty_tally_and_the_largest_total_weight_decrypt() -> None:
    assert decrypt_sums(KEY, SHARES, accumulate(KEY, None, 1, 0)) == (0, 0, 0)
    total = None
    for choice in CHOICES:
        c = check_ballot(KEY, cast(KEY, choice, CONTEXT), CONTEXT)
        total = accumulate(KEY, total, c, SLOT - 1)  # each slot full, none carries
    assert total is not None
    assert decrypt_sums(KEY, SHARES, total) == (SLOT - 1, SLOT - 1, SLOT - 1)


def test_a_ballot_is_well_under_the_event_limit() -> None:
    assert len(cast(KEY, "YES", CONTEXT)) < 4096  # 1024-bit key; ~2.9 KB at 2048
    assert SLOT == 2**SLOT_BITS == MESSAGES[1]


@pytest.mark.parametrize("plaintext", [2, SLOT + 1, SLOT**3, SLOT**2 * 2, KEY.n - 1],
                         ids=["2", "B+1", "B^3", "2B^2", "n-1"])
@pytest.mark.parametrize("claim", range(3))
def test_a_ballot_for_anything_but_the_three_choices_is_refused(plaintext: int,
                                                                 claim: int) -> None:
    _refused("bad-proof", _forged(plaintext, claim))


def test_the_forger_itself_makes_ballots_that_pass_for_real_choices() -> None:
    # so the refusals above are the proof working, not the forger being wrong
    for k in range(3):
        c = check_ballot(KEY, _forged(MESSAGES[k], k), CONTEXT)
        assert decrypt_sums(KEY, SHARES, c) == tuple(int(i == k) for i in range(3))


def test_a_ballot_copied_into_another_context_is_refused() -> None:
    ballot = cast(KEY, "YES", CONTEXT)
    assert check_ballot(KEY, ballot, CONTEXT)
    _refused("bad-proof", ballot, b"destra-test/proposal-7/voter-mallory")
    _refused("bad-proof", ballot, b"destra-test/proposal-8/voter-alice")


def test_a_ballot_checked_against_another_key_is_refused() -> None:
    other, _ = generate_tally_key(bits=1024, shares=1)
    with pytest.raises(InvalidBallot):
        check_ballot(other, cast(KEY, "NO", CONTEXT), CONTEXT)


def test_a_tampered_ciphertext_or_proof_is_refused() -> None:
    values = _parse(cast(KEY, "NO", CONTEXT))
    c = values[0]
    for changed in (c * (1 + KEY.n) % KEY.n2,  # Enc(m + 1): NO becomes NO + 1 YES
                    c * _powmod(3, KEY.n, KEY.n2) % KEY.n2,  # re-randomized
                    c ^ 1):
        _refused("bad-proof", _encode([changed, *values[1:]]))
    for i in range(1, 10):  # each commitment, challenge and response in turn
        tampered = list(values)
        tampered[i] = tampered[i] + 1
        with pytest.raises(InvalidBallot) as caught:
            check_ballot(KEY, _encode(tampered), CONTEXT)
        assert caught.value.code == "bad-proof"


def test_ciphertexts_out_of_range_or_not_units_are_refused() -> None:
    proof = _parse(cast(KEY, "ABSTAIN", CONTEXT))[1:]
    factor = _a_factor_of_n()  # a ciphertext sharing it with n would factor n
    for c in (0, KEY.n2, KEY.n2 + 5, KEY.n, factor, factor * 12345):
        error = _refused("invalid-ciphertext", _encode([c, *proof]))
        assert "ciphertext" in str(error)


def _a_factor_of_n() -> int:
    """A prime factor of n, from d (a multiple of lambda) by the standard factoring trick."""
    n = KEY.n
    d = sum(s.exponent for s in SHARES)  # d = lambda * mu: a multiple of lambda
    m = d
    while m % 2 == 0:
        m //= 2
    for g in range(2, 100):
        x = pow(g, m, n)
        while True:
            y = x * x % n
            if y == 1:
                p = math.gcd(x - 1, n)
                if 1 < p < n:
                    return p
                break
            x = y
    raise AssertionError("no factor found")


def test_proof_values_out_of_range_are_refused() -> None:
    values = _parse(cast(KEY, "YES", CONTEXT))
    for i, bad in [(1, 0), (1, KEY.n2), (4, 1 << 128), (7, 0), (7, KEY.n), (9, KEY.n + 1)]:
        tampered = list(values)
        tampered[i] = bad
        _refused("bad-proof", _encode(tampered))


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\x02" + b"\x00\x01\x05" * 10, b"\x01", b"\x01\x00", b"\x01\x00\x00",
    b"\x01\x00\x02\x00\x05" + b"\x00\x01\x05" * 9,  # leading zero: not canonical
])
def test_truncated_or_garbage_bytes_are_refused_as_malformed(data: bytes) -> None:
    _refused("malformed-ballot", data)


def test_a_ballot_cut_short_or_extended_is_malformed() -> None:
    ballot = cast(KEY, "NO", CONTEXT)
    for cut in (1, 3, len(ballot) // 2, len(ballot) - 1):
        _refused("malformed-ballot", ballot[:cut])
    _refused("malformed-ballot", ballot + b"\x00")


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(st.binary(max_size=600) | st.builds(
    lambda prefix, rest: prefix + rest,
    st.just(b"\x01"), st.lists(st.binary(min_size=1, max_size=140).map(
        lambda raw: len(raw).to_bytes(2, "big") + raw), min_size=10, max_size=10).map(b"".join)))
def test_arbitrary_bytes_are_refused_with_a_reason_never_an_exception(data: bytes) -> None:
    with pytest.raises(InvalidBallot) as caught:
        check_ballot(KEY, data, CONTEXT)
    assert caught.value.code in ("malformed-ballot", "invalid-ciphertext", "bad-proof")


VALID = cast(KEY, "NO", CONTEXT)


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(st.integers(0, len(VALID) - 1), st.integers(1, 255))
def test_a_valid_ballot_with_any_byte_changed_is_refused(at: int, flip: int) -> None:
    data = bytearray(VALID)
    data[at] ^= flip
    with pytest.raises(InvalidBallot):
        check_ballot(KEY, bytes(data), CONTEXT)


def test_the_same_choice_cast_twice_gives_different_ciphertexts() -> None:
    first, second = (_parse(cast(KEY, "YES", CONTEXT))[0] for _ in range(2))
    assert first != second
    assert decrypt_sums(KEY, SHARES, first) == decrypt_sums(KEY, SHARES, second) == (1, 0, 0)


def test_combine_with_one_share_missing_raises() -> None:
    c = check_ballot(KEY, cast(KEY, "YES", CONTEXT), CONTEXT)
    partials = [partial_decrypt(s, c) for s in SHARES]
    assert combine(KEY, partials) == (1, 0, 0)
    for missing in range(3):
        some = partials[:missing] + partials[missing + 1:]
        with pytest.raises(ValueError, match="every trustee"):
            combine(KEY, some)
        # a holder who does not know the share count still sees the product is no plaintext
        with pytest.raises(ValueError, match="do not combine"):
            combine(TallyPublicKey(KEY.n), some)


def test_the_partials_of_all_but_one_trustee_are_not_the_plaintext() -> None:
    c = check_ballot(KEY, cast(KEY, "NO", CONTEXT), CONTEXT)
    for missing in range(3):
        x = 1
        for s in SHARES[:missing] + SHARES[missing + 1:]:
            x = x * partial_decrypt(s, c) % KEY.n2
        assert x % KEY.n != 1  # not of the form 1 + m*n: reveals no m
        assert x != 1 + MESSAGES[1] * KEY.n


def test_a_tally_that_overflows_its_slots_raises() -> None:
    c = check_ballot(KEY, cast(KEY, "ABSTAIN", CONTEXT), CONTEXT)
    total = accumulate(KEY, accumulate(KEY, None, c, SLOT - 1), c, 1)  # abstain = 2**64
    with pytest.raises(ValueError, match="overflows"):
        decrypt_sums(KEY, SHARES, total)
    with pytest.raises(ValueError):
        accumulate(KEY, None, c, SLOT)
    with pytest.raises(ValueError):
        accumulate(KEY, None, c, -1)


def test_the_shares_are_statistically_larger_than_d_and_sum_to_it() -> None:
    d = sum(s.exponent for s in SHARES)
    assert pow(1 + KEY.n, d, KEY.n2) == 1 + KEY.n  # d = 1 mod n
    assert all(abs(s.exponent).bit_length() > d.bit_length() + 100 for s in SHARES)
    assert [s.index for s in SHARES] == [1, 2, 3] and {s.count for s in SHARES} == {3}


def test_keys_and_shares_round_trip_through_their_files() -> None:
    assert TallyPublicKey.from_bytes(KEY.to_bytes()) == KEY
    assert TallyPublicKey.from_bytes(TallyPublicKey(KEY.n).to_bytes()).shares is None
    assert KEY.fingerprint() == TallyPublicKey(KEY.n).fingerprint()
    for share in SHARES:
        assert TallyKeyShare.from_json(share.to_json()) == share
        assert str(share.exponent) not in repr(share)  # a logged share leaks nothing
    raw = json.loads(SHARES[0].to_json())
    raw["n"] = str(KEY.n + 2)
    with pytest.raises(ValueError, match="fingerprint"):
        TallyKeyShare.from_json(json.dumps(raw))
    for bad in (b"", b"\x01", b"\x02\x03\x05", b"\x01\x03\x00\x05"):
        with pytest.raises(ValueError):
            TallyPublicKey.from_bytes(bad)


def test_a_choice_outside_the_three_cannot_be_cast() -> None:
    with pytest.raises(ValueError):
        cast(KEY, "MAYBE", CONTEXT)
