"""What the secret ballot (governance.ballot) costs, and why it is built on phe + gmpy2.

    python bench/ballot.py [--voters 10000] [--bits 2048] [--sample N] [--out PATH]

1. Paillier libraries, per call (median of a small sample, this machine): keygen,
   encrypt, homomorphic add, multiply by a 40-bit stake, decrypt, in ``phe``
   (python-paillier 1.5.0, gmpy2 under it) and ``lightphe`` 0.0.27; then one
   4096-bit modular exponentiation by an n-sized exponent (a proof's unit of cost)
   in Python's ``pow`` and ``gmpy2.powmod``.
2. The chosen path, through governance.ballot's own functions, for ``--voters``
   voters with random choices and stakes (1 micro-token to 1 million tokens): keygen
   with 3 trustee shares, cast (encrypt + proof) and check per ballot, accumulate
   (c**stake into the running product) per ballot, partial decryption per trustee,
   combine; the ballot's size; totals for the whole electorate. Cast and check run
   on ``--sample`` voters (default: all of them); when that is fewer, their totals
   are the per-ballot time times ``--voters``, marked "extrapolated", and the tally
   re-randomizes the sample's checked ciphertexts (two multiplications each) to get
   one distinct ciphertext per voter: accumulate costs the same on any ciphertext.
   The decrypted sums are compared with the plain sums.
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gmpy2  # noqa: E402

from governance.ballot import (  # noqa: E402
    CHOICES,
    accumulate,
    cast,
    check_ballot,
    combine,
    generate_tally_key,
    partial_decrypt,
)

STAKE_MAX = 10**12  # micro-tokens: one million tokens, a 40-bit exponent
TRUSTEES = 3

lines: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    lines.append(line)


def median_s(fn: Callable[[], object], runs: int) -> float:
    """Median seconds per call over ``runs`` calls (each timed alone: calls are slow)."""
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:10.3f}"


def libraries(bits: int) -> None:
    """phe against lightphe, per primitive, and Python's pow against gmpy2's."""
    from lightphe.cryptosystems.Paillier import Paillier
    from phe import paillier

    weight = random.randrange(1, STAKE_MAX)
    public, private = paillier.generate_paillier_keypair(n_length=bits)
    x, y = public.encrypt(1), public.encrypt(2**64)
    light = Paillier(key_size=bits)
    lx, ly = light.encrypt(1), light.encrypt(2**64)
    rows = [
        ("keygen", median_s(lambda: paillier.generate_paillier_keypair(n_length=bits), 5),
         median_s(lambda: Paillier(key_size=bits), 3)),
        ("encrypt", median_s(lambda: public.encrypt(2**64), 20),
         median_s(lambda: light.encrypt(2**64), 10)),
        ("add", median_s(lambda: x + y, 200), median_s(lambda: light.add(lx, ly), 200)),
        ("multiply by stake", median_s(lambda: x * weight, 50),
         median_s(lambda: light.multiply_by_constant(lx, weight), 50)),
        ("decrypt", median_s(lambda: private.decrypt(x), 20),
         median_s(lambda: light.decrypt(lx), 10)),
    ]
    say(f"1. Paillier libraries at {bits} bits, ms per call (median; lightphe's n came out "
        f"{light.keys['public_key']['n'].bit_length()} bits):")
    say(f"   {'':<20} {'phe':>10} {'lightphe':>10} {'lightphe/phe':>13}")
    for name, a, b in rows:
        say(f"   {name:<20} {ms(a)} {ms(b)} {b / a:12.1f}x")
    n = int(public.n)
    n2, base = n * n, secrets.randbelow(n * n)
    py = median_s(lambda: pow(base, n, n2), 10)
    gmp = median_s(lambda: gmpy2.powmod(base, n, n2), 20)
    say(f"   {'powmod c**n mod n^2':<20} {'pow':>10} {'gmpy2':>10} {'pow/gmpy2':>13}")
    say(f"   {'':<20} {ms(py)} {ms(gmp)} {py / gmp:12.1f}x")
    say("   chosen: phe for keygen and encryption (gmpy2 under it), gmpy2.powmod for the "
        "proofs, tally and shares; lightphe refused regardless of speed (random.random "
        "primes and nonces, n of no fixed size)")


def chosen(voters: int, sample: int, bits: int) -> None:
    """The ballot's own functions, for a whole electorate."""
    rng = random.Random(1)
    say(f"\n2. governance.ballot at {bits} bits, {voters:,} voters, {TRUSTEES} trustees "
        f"(cast and check on {sample:,} of them):")
    keygen = median_s(lambda: generate_tally_key(bits, TRUSTEES), 3)
    key, shares = generate_tally_key(bits, TRUSTEES)
    choices = [rng.choice(CHOICES) for _ in range(voters)]
    weights = [rng.randrange(1, STAKE_MAX) for _ in range(voters)]
    contexts = [b"destra-bench/proposal-1/voter-%d" % i for i in range(voters)]

    t = time.perf_counter()
    ballots = []
    for i in range(sample):
        ballots.append(cast(key, choices[i], contexts[i]))
        if (i + 1) % 1000 == 0:
            print(f"   ... cast {i + 1:,}", flush=True)
    cast_s = time.perf_counter() - t
    t = time.perf_counter()
    ciphertexts = []
    for i, ballot in enumerate(ballots):
        ciphertexts.append(check_ballot(key, ballot, contexts[i]))
        if (i + 1) % 1000 == 0:
            print(f"   ... checked {i + 1:,}", flush=True)
    check_s = time.perf_counter() - t

    if sample < voters:  # one distinct ciphertext per voter, same plaintext as its source
        n, n2 = key.n, key.n2
        pool = [int(gmpy2.powmod(secrets.randbelow(n - 2) + 2, n, n2)) for _ in range(100)]
        for i in range(sample, voters):
            source = i % sample
            choices[i] = choices[source]
            ciphertexts.append(ciphertexts[source] * pool[i % 100] * pool[i // 100 % 100] % n2)
    t = time.perf_counter()
    total = None
    for c, w in zip(ciphertexts, weights, strict=True):
        total = accumulate(key, total, c, w)
    tally_s = time.perf_counter() - t
    assert total is not None

    t = time.perf_counter()
    partials = [partial_decrypt(s, total) for s in shares]
    partial_s = (time.perf_counter() - t) / TRUSTEES
    combine_s = median_s(lambda: combine(key, partials), 20)
    sums = combine(key, partials)
    plain = tuple(sum(w for ch, w in zip(choices, weights, strict=True) if ch == name)
                  for name in CHOICES)
    size = statistics.mean(len(b) for b in ballots)

    per = [("keygen (+ split into 3 shares)", keygen, 1),
           ("cast, per ballot", cast_s / sample, voters),
           ("check, per ballot", check_s / sample, voters),
           ("accumulate, per ballot", tally_s / voters, voters),
           ("partial decryption, per trustee", partial_s, TRUSTEES),
           ("combine", combine_s, 1)]
    say(f"   {'':<34} {'ms each':>10} {'x':>7} {'total s':>10}")
    for name, each, count in per:
        say(f"   {name:<34} {ms(each)} {count:7,} {each * count:10.2f}")
    mark = "" if sample == voters else " (extrapolated from the sample)"
    say(f"   ballot size: {size:,.0f} bytes (mean of {len(ballots):,})")
    say(f"   {voters:,} voters: cast {cast_s / sample * voters:,.1f} s{mark}, "
        f"check {check_s / sample * voters:,.1f} s{mark}, tally (accumulate) "
        f"{tally_s:,.2f} s measured, decryption {partial_s * TRUSTEES + combine_s:.3f} s "
        f"({TRUSTEES} partials + combine)")
    say(f"   decrypted sums {sums} {'==' if sums == plain else '!='} plain sums {plain}")
    if sums != plain:
        raise SystemExit("tally does not match the plain sums")


def _revision() -> str:
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                               text=True, check=True, cwd=here).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voters", type=int, default=10_000)
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--sample", type=int, default=None,
                        help="cast and check this many ballots (default: every voter's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    sample = min(args.sample or args.voters, args.voters)
    say(f"bench/ballot.py --voters {args.voters} --bits {args.bits} --sample {sample} "
        f"(revision {_revision()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    libraries(args.bits)
    chosen(args.voters, sample, args.bits)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
