"""What runs inside the child: load and check a user program, iterate its steps.

One step calls the program on its inputs. With ``carry = k``, the first ``k`` outputs
of step ``s`` replace the first ``k`` inputs of step ``s + 1`` (a training step maps
``(params, optimizer state, batch) -> (params', state', loss)``); the other inputs
stay. The task's result is the outputs of the last step.

A *state* is what a checkpoint holds after step ``s``: all the outputs of step ``s``
(``out0..``), or for ``s = 0`` the first ``k`` inputs (``in0..``). Running segments one
after another from these states gives the same bits as one uninterrupted run: the
carried tensors are exactly the next step's inputs.

These functions also run in-process (``local_run``, for submitters and tests): the
child is only there for the limits.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import ClassVar

from workloads.base import WorkRefused, deterministic
from workloads.lazy import torch
from workloads.program_check import check_shapes, load_program, no_unpickling, signature_specs
from workloads.program_cost import estimate_loaded, largest_tensor_bytes
from workloads.program_sandbox import Reply, large_tensors_from_the_heap
from workloads.program_tensors import (
    numbered,
    positional,
    read_tensors,
    tensor_bytes,
    write_tensors,
)


@dataclass(frozen=True)
class Job:
    """One run of steps in a child: from state ``start`` to each of ``boundaries``."""

    program: bytes
    inputs: bytes | memoryview
    """The input file; in a sandbox child, a writable view of the mapped job (tensors are
    made from it without a copy)."""
    device: str
    carry: int
    start_step: int
    """Steps already done; 0 starts from the input file."""
    start_state: bytes | memoryview | None
    """The state after ``start_step`` (``write_tensors`` bytes); None when 0."""
    boundaries: tuple[int, ...]
    """Ascending step counts after which to return the state; the last is where to stop."""
    record_bytes: int = -1
    """The states of boundaries before the last are returned only when their tensors hold
    at most this many bytes (-1: always); their sizes always are (facts ``sizes``)."""
    declared: tuple[int, int, int] | None = None
    """``(units, memory_mb, steps)`` the task declares: checked against the program's own
    estimate before the first step (``check_declared``); None: not checked."""

    mapped_fields: ClassVar[tuple[str, ...]] = ("inputs", "start_state")
    """Fields a sandbox child gets as mapped views (``program_sandbox.MAPPED_BYTES``)."""


UNDERSTATED_TOLERANCE = 1.1
"""A declared cost may be this much under the node's own estimate before it is refused:
the estimate is exact for one torch version, and a node on another may decompose an
operator differently and count a few percent more."""


def check_declared(ep: torch.export.ExportedProgram, given: list[torch.Tensor],
                   declared: tuple[int, int, int]) -> None:
    """``WorkRefused("understated-cost")`` when the task declares fewer compute units or
    less memory than the program's estimate (``workloads.program_cost``), beyond
    ``UNDERSTATED_TOLERANCE``: a submitter who wrote a smaller number than their client
    computed would be paying for less than the nodes run."""
    units, memory_mb, steps = declared
    with no_unpickling():
        est = estimate_loaded(ep, given, steps)
    if est.units > units * UNDERSTATED_TOLERANCE or est.memory_mb > memory_mb * \
            UNDERSTATED_TOLERANCE:
        raise WorkRefused("understated-cost", f"the task declares {units} compute units and "
                          f"{memory_mb} MiB; the program's graph costs {est.units} units and "
                          f"{est.memory_mb} MiB")


def _state_tensors(state: bytes | memoryview, prefix: str, count: int) -> list[torch.Tensor]:
    named = read_tensors(state)
    tensors = positional(prefix, named)
    if len(tensors) < count:
        raise WorkRefused("shape-mismatch", f"a state holds {len(tensors)} tensors, "
                          f"{count} are carried")
    return tensors


def run_job(job: Job) -> Reply:
    """Load, check, and run ``job``; the states at its boundaries as blobs ``s<step>``.

    Facts: ``steps``, ``sizes`` (see ``_iterate``) and ``timing``: this process's seconds
    loading and checking, in the step loop and writing states, and its page faults
    (``minflt``) over the whole run, for the node's log."""
    began, faults = time.perf_counter(), _minor_faults()
    device = torch.device(job.device)
    ep = load_program(job.program)
    huge_pages = not large_tensors_from_the_heap(largest_tensor_bytes(ep))
    ins, outs = signature_specs(ep)
    given = positional("in", read_tensors(job.inputs))
    check_shapes(ins, outs, given, job.carry)
    if job.declared is not None:
        check_declared(ep, given, job.declared)
    if job.start_state is not None:
        prefix = "out" if job.start_step > 0 else "in"
        carried = _state_tensors(job.start_state, prefix, job.carry)[:job.carry]
        check_shapes(ins, outs, carried + given[job.carry:], job.carry)
        given = carried + given[job.carry:]
    # No allowed op exposes uninitialized memory (no ``empty*``: program_check), so the
    # NaN-filling of every new tensor that deterministic mode does is a wasted memory
    # pass here (it doubled the time of memory-bound steps); restored after the run.
    settings = torch.utils.deterministic
    filling = settings.fill_uninitialized_memory  # type: ignore[attr-defined]
    settings.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    checked = time.perf_counter()
    try:
        blobs, sizes, writing = _iterate(ep, given, job, device)
    finally:
        settings.fill_uninitialized_memory = filling  # type: ignore[attr-defined]
    ended = time.perf_counter()
    timing = {"check_s": round(checked - began, 4), "loop_s": round(ended - checked - writing, 4),
              "write_s": round(writing, 4), "minflt": _minor_faults() - faults,
              "huge_pages": huge_pages}
    return Reply(facts={"steps": job.boundaries[-1], "sizes": sizes, "timing": timing},
                 blobs=blobs)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _iterate(ep: torch.export.ExportedProgram, given: list[torch.Tensor], job: Job,
             device: torch.device) -> tuple[dict[str, bytes], dict[str, int], float]:
    """The step loop of ``run_job``: the state at each boundary as a tensor file (those
    ``job.record_bytes`` allows), and every state's size in bytes, by ``s<step>``; the
    seconds spent writing those files."""
    blobs: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    writing = 0.0
    with deterministic(device), torch.no_grad():
        module = ep.module().to(device)
        args = [t.to(device) for t in given]
        step = job.start_step
        for boundary in job.boundaries:
            if boundary <= step:
                raise WorkRefused("program-failed", f"boundary {boundary} is not after "
                                  f"step {step}")
            outputs: list[torch.Tensor] = []
            while step < boundary:
                outputs = _call(module, args)
                args = outputs[:job.carry] + args[job.carry:]
                step += 1
            size = tensor_bytes(outputs)
            sizes[f"s{boundary}"] = size
            if boundary == job.boundaries[-1] or not 0 <= job.record_bytes < size:
                began = time.perf_counter()
                blobs[f"s{boundary}"] = write_tensors(numbered("out", outputs))
                writing += time.perf_counter() - began
    return blobs, sizes, writing


def _call(module: torch.nn.Module, args: list[torch.Tensor]) -> list[torch.Tensor]:
    result = module(*args)
    leaves = torch.utils._pytree.tree_leaves(result)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise WorkRefused("bad-program", "the program returned something other than tensors")
    return [t.detach() for t in leaves]


def local_run(program: bytes, inputs: bytes, *, steps: int, carry: int,
              device: str = "cpu") -> list[torch.Tensor]:
    """The final outputs of ``steps`` steps, computed in this process (no limits)."""
    reply = run_job(Job(program=program, inputs=inputs, device=device, carry=carry,
                        start_step=0, start_state=None, boundaries=(steps,)))
    return positional("out", read_tensors(reply.blobs[f"s{steps}"]))
