"""What confidentiality and signatures cost per task, and their share of a task's life.

    python bench/crypto.py [--tasks 150] [--no-network]

1. Backends, per call (median of many, this machine): Ed25519 sign and verify in
   PyNaCl, pyca/cryptography and pycryptodome; AES-256-GCM of 200 bytes in
   pyca/cryptography and pycryptodome. ``destra.crypto`` uses the fastest of each.
2. Per task (3 replicas, quorum 2), through the project's own functions, the
   operations a task really goes through, grouped:
   * encryption: the submitter seals the private input, each node opens it and
     seals its result to the submitter, the submitter opens one result;
   * grants: the submitter wraps the data key to each assigned node and signs
     the grant; each node checks the signature and unwraps; the verifier checks
     the signature;
   * signatures: the submission (signed; checked by the ledger), 3 commits and
     3 reveals (signed by nodes; checked by the verifier).
3. The lifecycle benchmark (``bench/lifecycle.py``, every task encrypted and
   granted) on a local network, for the throughput and mean submit -> verified
   time measured in the same run; the per-task cost is then printed as a share
   of that time and as a share of this machine's CPU at that throughput.
4. What one signature over a Merkle root of k commitments would save on the
   verifier, estimated from the measured verify and SHA-256 costs (not built).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from destra.confidential import (  # noqa: E402
    grant,
    open_grant,
    open_input,
    open_result,
    seal_input,
    seal_result,
)
from destra.crypto import KeyPair, sign_event, verify_event  # noqa: E402
from schemas.samples import sample_event  # noqa: E402

REPLICAS = 3


def per_call_us(fn: Callable[[], object], seconds: float = 0.3) -> float:
    """Median microseconds per call over batches filling about ``seconds``."""
    fn()
    batch, samples = 1, []
    while True:  # a batch of about 1 ms
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        if time.perf_counter() - t > 0.001 or batch > 10**6:
            break
        batch *= 2
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t) / batch * 1e6)
    return statistics.median(samples)


def backends() -> None:
    """The choice in ``destra.crypto``, measured again."""
    from Crypto.Cipher import AES
    from Crypto.PublicKey import ECC
    from Crypto.Signature import eddsa
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from nacl.signing import SigningKey

    msg, data, key, nonce = os.urandom(230), os.urandom(200), os.urandom(32), os.urandom(12)
    nacl_key = SigningKey.generate()
    nacl_sig = nacl_key.sign(msg).signature
    pyca_key = Ed25519PrivateKey.generate()
    pyca_sig = pyca_key.sign(msg)
    dome_key = ECC.generate(curve="ed25519")
    dome_sig = eddsa.new(dome_key, "rfc8032").sign(msg)
    dome_verifier = eddsa.new(dome_key.public_key(), "rfc8032")
    aesgcm = AESGCM(key)

    def dome_gcm() -> None:
        AES.new(key, AES.MODE_GCM, nonce=nonce).encrypt_and_digest(data)

    rows = [
        ("Ed25519 sign", per_call_us(lambda: nacl_key.sign(msg)),
         per_call_us(lambda: pyca_key.sign(msg)),
         per_call_us(lambda: eddsa.new(dome_key, "rfc8032").sign(msg))),
        ("Ed25519 verify", per_call_us(lambda: nacl_key.verify_key.verify(msg, nacl_sig)),
         per_call_us(lambda: pyca_key.public_key().verify(pyca_sig, msg)),
         per_call_us(lambda: dome_verifier.verify(msg, dome_sig))),
        ("AES-256-GCM 200 B", math.nan, per_call_us(lambda: aesgcm.encrypt(nonce, data, b"")),
         per_call_us(dome_gcm)),
    ]
    print("1. backends, us per call (median):")
    print(f"   {'':<18} {'PyNaCl':>9} {'pyca':>9} {'pycryptodome':>13}")
    for name, a, b, c in rows:
        print(f"   {name:<18} {a:9.1f} {b:9.1f} {c:13.1f}")
    print("   destra.crypto uses PyNaCl for Ed25519, pyca/cryptography for AES-GCM, X25519, "
          "HKDF")


def per_task() -> dict[str, float]:
    """Microseconds of cryptography per task, by group, through the project's functions."""
    submitter, node = KeyPair.generate(), KeyPair.generate()
    task_id = "task-0123456789abcdef0123"
    private = {"seed": "7"}  # the lifecycle benchmark's private parameters
    data_key, sealed_input = seal_input(task_id, private)
    output = b'{"workload":"heat2d","field":"' + b"x" * 700 + b'"}'  # about heat2d 8x8's size
    sealed_output = seal_result(submitter.encryption_public, task_id, "n0", 0, output)
    g = sign_event(grant("alice", task_id, "n0", 0, data_key, node.encryption_public),
                   submitter, "alice")
    submission = sign_event(sample_event("TaskSubmitted"), submitter, "alice")
    commit = sign_event(sample_event("ResultCommitted"), node, "n0")
    reveal = sign_event(sample_event("ResultRevealed"), node, "n0")

    ops = {
        "seal input (submitter)": (1, lambda: seal_input(task_id, private)),
        "open input (node)": (REPLICAS, lambda: open_input(data_key, task_id, sealed_input)),
        "seal result (node)": (REPLICAS, lambda: seal_result(
            submitter.encryption_public, task_id, "n0", 0, output)),
        "open result (submitter)": (1, lambda: open_result(
            (submitter,), task_id, "n0", 0, sealed_output)),
        "wrap + sign grant (submitter)": (REPLICAS, lambda: sign_event(grant(
            "alice", task_id, "n0", 0, data_key, node.encryption_public), submitter, "alice")),
        "check + unwrap grant (node)": (REPLICAS, lambda: (
            verify_event(g, submitter.signing_public, "alice"), open_grant(node, g))),
        "check grant (verifier)": (REPLICAS, lambda: verify_event(
            g, submitter.signing_public, "alice")),
        "sign submission": (1, lambda: sign_event(submission, submitter, "alice")),
        "check submission (ledger)": (1, lambda: verify_event(
            submission, submitter.signing_public, "alice")),
        "sign commit + reveal (node)": (REPLICAS, lambda: (
            sign_event(commit, node, "n0"), sign_event(reveal, node, "n0"))),
        "check commit + reveal (verifier)": (REPLICAS, lambda: (
            verify_event(commit, node.signing_public, "n0"),
            verify_event(reveal, node.signing_public, "n0"))),
    }
    groups = {"encryption": list(ops)[:4], "grants": list(ops)[4:7],
              "signatures": list(ops)[7:]}
    print(f"\n2. per task ({REPLICAS} replicas), us (median per call x calls per task):")
    cost: dict[str, float] = {}
    for group, names in groups.items():
        total = 0.0
        for name in names:
            calls, fn = ops[name]
            us = per_call_us(fn)
            total += calls * us
            print(f"   {group:<10} {name:<34} {us:8.1f} x {calls} = {calls * us:8.1f}")
        cost[group] = total
    cost["verify"] = per_call_us(lambda: verify_event(commit, node.signing_public, "n0"))
    cost["sha256"] = per_call_us(lambda: hashlib.sha256(bytes(64)).digest())
    total = sum(cost[g] for g in groups)
    for group in groups:
        print(f"   {group:<10} total {cost[group]:9.1f} us per task")
    print(f"   all        total {total:9.1f} us per task")
    cost["total"] = total
    return cost


def shares(cost: dict[str, float], figures: dict[str, float]) -> None:
    """The per-task cost against the lifecycle benchmark's measured figures."""
    tput, latency_ms = figures.get("throughput", 0.0), figures.get("mean_to_verified_ms", 0.0)
    cores = os.cpu_count() or 1
    print(f"\n3. at the lifecycle benchmark's {tput:.1f} tasks/s, mean submit -> verified "
          f"{latency_ms:.0f} ms (measured above, this run):")
    for group in ("encryption", "grants", "signatures", "total"):
        share_latency = cost[group] / (latency_ms * 1000) if latency_ms else math.nan
        share_cpu = cost[group] * tput / (cores * 1e6)
        print(f"   {group:<10} {cost[group]:9.1f} us per task = {100 * share_latency:7.4f} % of "
              f"end-to-end time; {100 * share_cpu:6.3f} % of {cores} cores at {tput:.1f}/s")
    if tput:
        print(f"   at 1,000 tasks/s the same work would take {cost['total'] / 1e6 * 1000:.2f} "
              f"core-seconds per second")


def merkle(cost: dict[str, float]) -> None:
    """Verifier cost of 2 x 3 signature checks per task, alone or one per batch of k."""
    per_task_now = 2 * REPLICAS * cost["verify"]
    print("\n4. verifier signature checks per task (commits + reveals), one signature per "
          "event now vs one per Merkle root of k events (estimate, not built):")
    print(f"   now: {per_task_now:.1f} us")
    for k in (8, 32, 128):
        batched = 2 * REPLICAS * (cost["verify"] / k + math.log2(k) * cost["sha256"])
        print(f"   k={k:<4} {batched:7.1f} us ({per_task_now / batched:4.1f}x less)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=150,
                        help="tasks for the lifecycle run (default 150)")
    parser.add_argument("--no-network", action="store_true",
                        help="per-call and per-task figures only, no lifecycle run")
    args = parser.parse_args()
    backends()
    cost = per_task()
    figures: dict[str, float] = {}
    if not args.no_network:
        import lifecycle

        print(f"\nlifecycle run, {args.tasks} encrypted tasks:")
        tmp = Path(tempfile.mkdtemp(prefix="destra-bench-"))
        try:
            figures = lifecycle.run(args.tasks, 4, 8, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shares(cost, figures)
    merkle(cost)


if __name__ == "__main__":
    main()
