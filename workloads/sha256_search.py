"""Proof-of-work style nonce search over SHA-256, with hashlib (exact integer output)."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from destra.errors import InvalidParams
from workloads.base import ParamSpec, Workload, WorkloadResult, finish, units
from workloads.canonical import canonical_json
from workloads.lazy import torch

# Integer operations per 64-byte SHA-256 compression: 64 rounds of about 30 ops plus a
# 48-word message schedule of about 10 ops each. This is the hash-to-FLOP exchange rate.
OPS_PER_BLOCK = 2500
_MAX_PREFIX_BYTES = 47  # prefix, 8-byte nonce and 9 bytes of padding: one block
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})*")


class Sha256Search(Workload):
    """Nonces in [start, start+count) whose SHA-256(prefix || nonce) has `difficulty` zeros."""

    name = "sha256-search"
    doc = (
        "Scan nonces in [start, start + count) and keep those where SHA-256(prefix || nonce "
        "as 8-byte big-endian) has at least `difficulty` leading zero bits. Runs on the CPU "
        "with hashlib whatever the device: torch has no integer SHA-256 kernel and a "
        "hand-written one would be slower than OpenSSL. Output is exact: the total number "
        "found and the smallest `max_results` nonces (digest_bits = 0)."
    )
    params = (
        ParamSpec(name="prefix", kind="str", default="6465737472613a",
                  doc="message prefix as lower-case hex, at most 47 bytes"),
        ParamSpec(name="start", kind="int", default=0, min=0, max=2**64 - 1,
                  doc="first nonce"),
        ParamSpec(name="count", public=True, kind="int", default=2000, min=1, max=100_000_000,
                  doc="nonces to try"),
        ParamSpec(name="difficulty", kind="int", default=8, min=1, max=64,
                  doc="required leading zero bits"),
        ParamSpec(name="max_results", kind="int", default=64, min=1, max=1000,
                  doc="nonces listed in the output (all are counted)"),
    )
    bit_exact = False
    digest_bits = 0
    uses_accelerator = False

    def check(self, params: dict[str, Any]) -> None:
        """The prefix is even-length lower-case hex; the range stays within 64-bit nonces."""
        prefix = params["prefix"]
        if not _HEX_RE.fullmatch(prefix) or len(prefix) > 2 * _MAX_PREFIX_BYTES:
            raise InvalidParams(
                f"{self.name}: parameter 'prefix' = {prefix!r} is not allowed; allowed: "
                f"lower-case hex, even length, at most {2 * _MAX_PREFIX_BYTES} characters")
        if params["start"] + params["count"] > 2**64:
            raise InvalidParams(
                f"{self.name}: parameter 'count' = {params['count']!r} runs past nonce 2^64 "
                f"from start {params['start']}; allowed: start + count <= 2^64")

    def compute_units(self, params: dict[str, Any]) -> int:
        """One compression block per hash: the prefix is bounded so that it always fits.

        The prefix is private (it travels encrypted), so the cost must not depend on it.
        """
        return units(params["count"] * OPS_PER_BLOCK)

    def memory_mb(self, params: dict[str, Any]) -> int:
        """Constant: one hash state and the capped result list."""
        return 1

    def run(self, params: dict[str, Any], device: torch.device) -> WorkloadResult:
        """Scan the range; ``device`` is accepted for the common interface and not used."""
        started = time.perf_counter_ns()
        # Hash the prefix once and copy its state per nonce (the "midstate" trick).
        base = hashlib.sha256(bytes.fromhex(params["prefix"]))
        shift = 256 - params["difficulty"]
        found: list[int] = []
        total = 0
        best_nonce, best_value = params["start"], 1 << 256
        for nonce in range(params["start"], params["start"] + params["count"]):
            h = base.copy()
            h.update(nonce.to_bytes(8, "big"))
            value = int.from_bytes(h.digest(), "big")
            if value < best_value:
                best_nonce, best_value = nonce, value
            if value >> shift == 0:
                total += 1
                if len(found) < params["max_results"]:
                    found.append(nonce)
        output = canonical_json({"workload": self.name, "params": params,
                                 "total_found": total, "nonces": found})
        summary = {"total_found": total, "hashes": params["count"], "best_nonce": best_nonce,
                   "best_zero_bits": 256 - best_value.bit_length()}
        return finish(output, summary, started, torch.device("cpu"))
