"""What the three example programs share: writing the files and submitting them.

Each example builds an ExportedProgram and its inputs (``build``), writes ``<name>.pt2``
and ``<name>.safetensors`` with ``workloads.program.save_program`` / ``save_inputs``,
prints the quote's estimate, and with ``--submit`` sends the task through
``destra.client.Client.quote_program`` then ``Client.submit``, follows it to its verdict
and writes the verified outputs to ``<name>.out.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python examples/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

from workloads.program import estimate, save_inputs, save_program  # noqa: E402


@dataclass(frozen=True)
class Example:
    """An exported program, its inputs and how the task iterates it."""

    ep: torch.export.ExportedProgram
    inputs: tuple[torch.Tensor, ...]
    steps: int = 1
    carry: int = 0
    mantissa_bits: int = 0


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options every example takes."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("out_dir", nargs="?", default=".", type=Path,
                        help="where to write <name>.pt2 and <name>.safetensors")
    parser.add_argument("--submit", action="store_true",
                        help="submit it through destra.client.Client (a running network), "
                             "wait for its verdict, write <name>.out.safetensors")
    parser.add_argument("--account", default="alice", help="the submitting account")
    parser.add_argument("--replicas", type=int, default=None)
    parser.add_argument("--tier", default="consumer")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the verdict")
    return parser


def main(name: str, example: Example, args: argparse.Namespace) -> None:
    """Write the files, print the estimate, submit when asked."""
    program, inputs = save_program(example.ep), save_inputs(example.inputs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.pt2").write_bytes(program)
    (args.out_dir / f"{name}.safetensors").write_bytes(inputs)
    est = estimate(program, inputs, example.steps, example.carry)
    print(f"{name}: {len(program)} bytes of program, {len(inputs)} of inputs; steps="
          f"{example.steps} carry={example.carry} mantissa_bits={example.mantissa_bits}; "
          f"{est.units} units, {est.memory_mb} MiB, bound {est.max_runtime_ms} ms, "
          f"{est.ops} ops per step")
    if args.submit:
        submit(name, program, inputs, example, args)


def submit(name: str, program: bytes, inputs: bytes, example: Example,
           args: argparse.Namespace) -> None:
    """Quote and submit through the client (``Client.quote_program``, then ``submit``),
    follow the task to its verdict (the watch grants the assigned nodes the data key that
    opens the sealed program and inputs), and write the verified outputs."""
    from destra.cli_common import kafka_address, load_settings, passphrase
    from destra.client import Client
    from destra.errors import DestraError
    from infra import services

    settings = load_settings()
    client = Client(settings, kafka_address(settings, services, account=args.account),
                    args.account, passphrase())
    try:
        quote = client.quote_program(program, inputs, steps=example.steps,
                                     carry=example.carry,
                                     mantissa_bits=example.mantissa_bits,
                                     replicas=args.replicas, tier=args.tier)
        # The public parameters only: the private ones are the program's whole bytes.
        print("quote:", quote.as_dict(private=False))
        watch = client.watch()
        try:
            task_id = client.submit(quote)
            print("submitted:", task_id, flush=True)
            progress = client.wait([task_id], watch=watch, timeout_s=args.timeout)[task_id]
        finally:
            watch.close()
        if progress.state != "verified":
            raise DestraError(f"task {task_id} {progress.state}: {progress.as_dict()}")
        out = args.out_dir / f"{name}.out.safetensors"
        out.write_bytes(client.result(task_id, progress=progress).output)
        print(f"verified: wrote {out}")
    finally:
        client.close()
