"""Dense matrix-multiply benchmark whose result is exact on every device."""

from __future__ import annotations

import statistics
import time
from typing import Any

from destra.errors import WorkloadFailed
from workloads.base import (
    ParamSpec,
    Workload,
    WorkloadResult,
    cpu_generator,
    deterministic,
    finish,
    mebibytes,
    seed_spec,
    sync,
    units,
)
from workloads.canonical import canonical_json
from workloads.lazy import torch

# Entries are integers in [-8, 8]: every partial sum of a row-column product is an integer
# of magnitude <= 64 n <= 2^20 < 2^24, so float32 (and float64) GEMM is exact in any
# summation order, blocking or thread count. The benchmark measures the real kernel.
_ENTRY_MAX = 8
_DTYPES = ("float32", "float64")


class Matmul(Workload):
    """C = A @ B, ``repeats`` times; output = exact integer row and column sums of C."""

    name = "matmul"
    doc = (
        "Seeded n x n matrices with integer entries in [-8, 8], multiplied `repeats` times "
        "in float32 (or float64) with TF32 off. Integer inputs make the product exact on any "
        "card, so the output holds exact integer row and column sums of C (no rounding; "
        "digest_bits = 0) and is checked against an independent float64 matrix-vector "
        "product. Timing (best and median of the repeats) goes into the summary only."
    )
    params = (
        ParamSpec(name="n", public=True, kind="int", default=128, min=16, max=16_384,
                  doc="matrix side"),
        ParamSpec(name="repeats", public=True, kind="int", default=3, min=1, max=100,
                  doc="timed multiplications"),
        ParamSpec(name="dtype", public=True, kind="str", default="float32", choices=_DTYPES,
                  doc="element type of the multiplication"),
        seed_spec(),
    )
    bit_exact = False
    digest_bits = 0

    def compute_units(self, params: dict[str, Any]) -> int:
        """2 n^3 FLOPs per multiplication, plus the O(n^2) checks."""
        n = params["n"]
        return units(2 * n**3 * params["repeats"] + 6 * n**2)

    def memory_mb(self, params: dict[str, Any]) -> int:
        """A, B and C in the chosen dtype, plus float64 copies of all three for the checks."""
        n = params["n"]
        itemsize = 4 if params["dtype"] == "float32" else 8
        return mebibytes(3 * n * n * itemsize + 3 * n * n * 8)

    def run(self, params: dict[str, Any], device: torch.device) -> WorkloadResult:
        """Multiply, time each repeat, and output exact checksums of the product."""
        started = time.perf_counter_ns()
        n, dtype = params["n"], getattr(torch, params["dtype"])
        gen = cpu_generator(params["seed"])
        with deterministic(device):
            a64, b64 = (torch.randint(-_ENTRY_MAX, _ENTRY_MAX + 1, (n, n), generator=gen)
                        .to(device=device, dtype=torch.float64) for _ in range(2))
            a, b = a64.to(dtype), b64.to(dtype)
            times_ms = []
            product = a
            for _ in range(params["repeats"]):
                sync(device)
                t0 = time.perf_counter_ns()
                product = a @ b
                sync(device)
                times_ms.append((time.perf_counter_ns() - t0) / 1e6)
            c = product.to(torch.float64)
            row_sums, col_sums = c.sum(dim=1), c.sum(dim=0)
            # Row sums of A @ B equal A @ (B 1): an independent exact check of the GEMM.
            expected = a64 @ b64.sum(dim=1)
            if not torch.equal(row_sums, expected):
                raise WorkloadFailed(f"matmul: n={n} product failed its exact row-sum check")
            rows = [int(x) for x in row_sums.to(torch.int64).tolist()]
            cols = [int(x) for x in col_sums.to(torch.int64).tolist()]
        output = canonical_json({"workload": self.name, "params": params,
                                 "row_sums": rows, "col_sums": cols})
        best = min(times_ms)
        summary = {"best_ms": best, "median_ms": statistics.median(times_ms),
                   "gflops": 2 * n**3 / (best * 1e6) if best > 0 else None}
        return finish(output, summary, started, device)
