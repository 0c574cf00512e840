"""The GPU check: every workload and the three example programs on CUDA and on the CPU.

    python bench/gpu_check.py [--out DIR] [--quick]

One short script for a session lent a GPU machine (the ``device`` tool: no network
there, its own Python with torch). For each built-in workload at its default parameters
and each example program at a small size, it runs the node's own code path on the CPU
and, when CUDA is present, on the GPU: ``Workload.run``, which for a program is the
sandbox child with its CUDA limits (``workloads.program_sandbox``). It prints, per case:

* the seconds on each device;
* the digests' agreement. A task that need not run on one device class
  (``Workload.homogeneous`` false: rounded digests) must agree across CPU and GPU; a
  line saying ``MUST AGREE, DIFFERS`` is a bug. An exact task may differ (its replicas
  are placed on one device class); the script says whether it did;
* the node's capability on each device (``node_runner.capability.measure``).

Without CUDA it runs the CPU side only, so the script itself is checked here. It imports
the project's own modules, which need ``fastavro``, ``cramjam`` and ``pybase64`` beside
torch and numpy: a missing one is named, with how to carry it (``--help``). Writes the
report to ``DIR/gpu-check.txt`` (default ``bench/results``). Figures are printed,
never asserted.

Carrying the pure dependencies to a machine without network, for its Python version
(``X.Y``):

    .venv/bin/pip download --only-binary=:all: --python-version X.Y --no-deps \\
        -d .gpu-wheels fastavro cramjam pybase64
    # there: python -m pip install --no-index --target .gpu-deps .gpu-wheels/*.whl
    #        PYTHONPATH=.gpu-deps python bench/gpu_check.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

NEEDED = ("torch", "numpy", "fastavro", "cramjam", "pybase64")


def missing_modules() -> list[str]:
    """The modules of ``NEEDED`` this Python cannot import."""
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def cases(quick: bool) -> list[tuple[str, object, dict[str, object]]]:
    """``(label, workload, parsed parameters)``: the built-in workloads at their defaults,
    then the examples as program tasks (the quote's parameters, checked as a node does)."""
    import cnn_infer
    import mlp_train
    import wave2d

    from workloads import WORKLOADS
    from workloads.program import PROGRAM, program_params, save_inputs, save_program

    out: list[tuple[str, object, dict[str, object]]] = []
    for name, workload in WORKLOADS.items():
        if name != "program":
            out.append((name, workload, workload.validate({})))
    examples = {"wave2d 64^2, 20 steps, exact": wave2d.build(grid=64, steps=20),
                "mlp_train 12 steps, 20 bits": mlp_train.build(n=512, n_in=32, hidden=64,
                                                               steps=12),
                "cnn_infer batch 64, 16 bits": cnn_infer.build(batch=64, width=8)}
    if not quick:
        examples["wave2d 1024^2, 100 steps, exact"] = wave2d.build(grid=1024, steps=100)
        examples["cnn_infer batch 1024, 16 bits"] = cnn_infer.build(batch=1024, width=32)
    for label, ex in examples.items():
        raw = program_params(save_program(ex.ep), save_inputs(ex.inputs), steps=ex.steps,
                             carry=ex.carry, mantissa_bits=ex.mantissa_bits)
        out.append((f"program: {label}", PROGRAM, PROGRAM.validate(raw)))
    return out


def run_case(workload: object, params: dict[str, object], device: object
             ) -> tuple[float, bytes | str]:
    """Seconds and digest of one run, or its error as text."""
    started = time.perf_counter()
    try:
        result = workload.run(params, device)  # type: ignore[attr-defined]
    except Exception as e:  # a failure is a finding, reported with the rest
        return time.perf_counter() - started, f"{type(e).__name__}: {e}"[:300]
    return time.perf_counter() - started, result.digest


def report(quick: bool) -> list[str]:
    import torch

    from node_runner.capability import measure
    from workloads.program_sandbox import warm_up

    cuda = torch.cuda.is_available()
    devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if cuda else [])
    lines = [f"bench/gpu_check.py: torch {torch.__version__}, CUDA "
             f"{torch.version.cuda if cuda else 'absent: the CPU side only'}"
             + (f", {torch.cuda.get_device_name(0)}" if cuda else "")]
    for device in devices:
        cap = measure(device)
        lines.append(f"capability {device}: {cap.device_name}, class {cap.device_class}, "
                     f"{cap.tflops_milli / 1000:.3f} TFLOP/s float32 matmul, {cap.memory_mb} MiB")
    print("\n".join(lines), flush=True)
    warm_up()  # the sandbox's forkserver: its one-time start is no case's cost
    for label, workload, params in cases(quick):
        runs = [run_case(workload, params, device) for device in devices]
        times = ", ".join(f"{d.type} {s:.3f} s" for d, (s, _) in zip(devices, runs,
                                                                      strict=True))
        errors = [d for _, d in runs if isinstance(d, str)]
        exact = workload.homogeneous(params)  # type: ignore[attr-defined]
        if errors:
            verdict = "FAILED: " + " | ".join(errors)
        elif not cuda:
            verdict = f"digest {runs[0][1].hex()[:16]}"  # type: ignore[union-attr]
        elif runs[0][1] == runs[1][1]:
            verdict = "digests agree" + (" (exact task)" if exact else "")
        else:
            verdict = ("exact task: digests differ across device classes (allowed: placed "
                       "on one class)" if exact else "MUST AGREE, DIFFERS")
        lines.append(f"{label}: {times}; {verdict}")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="folder for gpu-check.txt (on the device machine: $OUT)")
    parser.add_argument("--quick", action="store_true", help="the small cases only")
    args = parser.parse_args()
    missing = missing_modules()
    if missing:
        raise SystemExit(f"gpu_check: cannot import {', '.join(missing)}; see --help for "
                         "carrying them to a machine without network")
    lines = report(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.txt").write_text("\n".join(lines) + "\n")
    print(f"written to {args.out / 'gpu-check.txt'}")


if __name__ == "__main__":
    main()
