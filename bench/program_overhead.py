"""What running a user program on a node costs beyond the program itself.

Compares, on one >= 2 s user task (the wave2d example on a large grid, many steps):

- bare: ``torch.export.load(...).module()`` and the step loop, in this process;
- node: ``Program.run`` (hash, size and archive checks, a fresh forkserver child, load
  with unpickling disabled, graph and shape checks, the loop under deterministic
  settings, canonical safetensors and its digest).

Also the forkserver's one-time start (torch imported once) and a warm child's start.
The network-level part (Kafka, commit-reveal) is not measured here. Writes
bench/results/program-overhead.txt.

    PYTHONPATH=. python bench/program_overhead.py [--grid 1024] [--steps 400]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import wave2d  # noqa: E402

from workloads import get_workload  # noqa: E402
from workloads.program import program_params, save_inputs, save_program  # noqa: E402
from workloads.program_sandbox import _nothing, run_in_child  # noqa: E402


def bare(program: bytes, inputs: tuple[torch.Tensor, ...], steps: int, carry: int) -> float:
    started = time.perf_counter()
    module = torch.export.load(io.BytesIO(program)).module()
    args = list(inputs)
    with torch.no_grad():
        for _ in range(steps):
            outs = list(module(*args))
            args = outs[:carry] + args[carry:]
    return time.perf_counter() - started


def child_start(n: int = 10) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        run_in_child(_nothing, None, device="cpu", memory_mb=1, bound_ms=60_000)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    example = wave2d.build(grid=args.grid, steps=args.steps)
    program, inputs = save_program(example.ep), save_inputs(example.inputs)
    workload = get_workload("program")
    params = workload.validate(program_params(program, inputs, steps=example.steps,
                                              carry=example.carry))
    started = time.perf_counter()
    run_in_child(_nothing, None, device="cpu", memory_mb=1, bound_ms=120_000)
    server = time.perf_counter() - started
    warm = child_start()
    bare_s, node_s = [], []
    for _ in range(args.repeats):
        bare_s.append(bare(program, example.inputs, example.steps, example.carry))
        t = time.perf_counter()
        workload.run(params, torch.device("cpu"))
        node_s.append(time.perf_counter() - t)
    b, n = statistics.median(bare_s), statistics.median(node_s)
    lines = [
        f"user task: wave2d grid {args.grid}x{args.grid} float64, {args.steps} steps "
        f"(carry 2), {params['units']} units; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"forkserver first start (torch imported once per node): {server * 1000:.0f} ms",
        f"warm child start + reply (median of 10): {warm * 1000:.1f} ms",
        f"bare torch.export.load + loop, in-process (median of {args.repeats}): {b:.3f} s "
        f"{[round(x, 3) for x in bare_s]}",
        f"node Program.run: checks + child + loop + digest (median of {args.repeats}): "
        f"{n:.3f} s {[round(x, 3) for x in node_s]}",
        f"ratio node / bare: {n / b:.3f} (medians), {min(node_s) / min(bare_s):.3f} (best "
        "of each: the machine is shared, the best run is the least disturbed)",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = ROOT / "bench" / "results" / "program-overhead.txt"
    out.write_text(text)


if __name__ == "__main__":
    main()
