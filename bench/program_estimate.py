"""Are user programs' estimates honest? ``units`` against measured runtime x node speed.

For each example at a size that runs one to a few seconds, the node's speed is measured as
``node_runner.capability`` does (float32 matmul, in units/s = TFLOP/s x 10^6), the
program is run by ``Program.run`` (child, warm forkserver; best of 3: the machine is
shared), and the ratio ``units / (runtime_s x speed)`` printed: 1 means the estimate is
exact for this node, within [0.5, 2] is the target. Writes
bench/results/program-estimate.txt.

    PYTHONPATH=. python bench/program_estimate.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import cnn_infer  # noqa: E402
import mlp_train  # noqa: E402
import wave2d  # noqa: E402

from node_runner.capability import matmul_tflops  # noqa: E402 (read only: the node's rule)
from workloads import get_workload  # noqa: E402
from workloads.program import program_params, save_inputs, save_program  # noqa: E402
from workloads.program_sandbox import warm_up  # noqa: E402

CASES = {
    "cnn_infer (batch 2048, width 32)": lambda: cnn_infer.build(batch=2048, width=32),
    "mlp_train (n 4096, 256-512-10, 100 steps)": lambda: mlp_train.build(
        n=4096, n_in=256, hidden=512, classes=10, steps=100),
    "wave2d (512x512 float64, 1000 steps)": lambda: wave2d.build(grid=512, steps=1000),
    "wave2d (1024x1024 float64, 400 steps)": lambda: wave2d.build(grid=1024, steps=400),
}


def main() -> None:
    cpu = torch.device("cpu")
    warm_up()
    workload = get_workload("program")
    rows = []
    for name, build in CASES.items():
        ex = build()
        program, inputs = save_program(ex.ep), save_inputs(ex.inputs)
        params = workload.validate(program_params(program, inputs, steps=ex.steps,
                                                  carry=ex.carry,
                                                  mantissa_bits=ex.mantissa_bits))
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            workload.run(params, cpu)
            best = min(best, time.perf_counter() - started)
        rows.append((name, params, best))
        print(f"{name}: runtime {best:.3f} s", flush=True)
    # The node's speed, as its capability probe measures it, before and after the runs
    # would differ on a shared machine: the median of five probes stands for the run.
    speeds = sorted(matmul_tflops(cpu) * 1e6 for _ in range(5))
    speed = speeds[2]
    lines = [f"node: cpu, {torch.get_num_threads()} threads, matmul speed {speed:,.0f} "
             f"units/s (median of 5 probes, {speeds[0]:,.0f}-{speeds[-1]:,.0f}); "
             "ratio = units / (runtime x speed), target within 2x: [0.5, 2]"]
    for name, params, best in rows:
        ratio = params["units"] / (best * speed)
        lines.append(f"{name}: {params['units']:,} units, {params['memory_mb']} MiB, "
                     f"runtime {best:.3f} s (best of 3, child included), ratio {ratio:.2f}, "
                     f"within 2x: {'yes' if 0.5 <= ratio <= 2 else 'NO'}")
    out = ROOT / "bench" / "results" / "program-estimate.txt"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
