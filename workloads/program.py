"""``program``: a submitter's own PyTorch program ("bring your own model", issue 15).

The submitter exports a program with ``torch.export`` and saves it with
``save_program`` (a pt2 archive holding no pickle), writes its inputs with
``save_inputs`` (safetensors, named ``in0..``), and asks for a quote with
``program_params``, which checks the program exactly as the nodes will, measures its
cost from the graph (``workloads.program_cost``) and returns the task's parameters.

Parameters (strings, as in every task):

- public, read by the ledger and the allocator: ``program_sha256`` and ``input_sha256``
  (64 lower-case hex: the signed submission binds every replica to these bytes),
  ``units`` (compute units of the whole run), ``memory_mb`` (peak), ``steps``,
  ``carry`` (leading outputs fed back as leading inputs: training state),
  ``mantissa_bits`` (0: the digest is over exact bits, so the replicas must share a
  device class, ``homogeneous``; else floats are rounded to that many explicit mantissa
  bits before hashing, ``workloads.canonical.round_tensor``), ``max_runtime_ms`` (the
  wall-clock bound; 0 means ``runtime_bound_ms(units)``, and a stated one may not exceed
  it: ``workloads.program_cost``).
- private, sealed to the assigned nodes: ``program`` and ``input``, standard padded
  base64 of the archive and of the tensor file.

A node runs ``check_sizes`` and the archive checks in its own process (pure Python),
then everything that touches torch in a fresh child process
(``workloads.program_sandbox``, ``workloads.program_run``), while another thread runs
``check_hashes``: nothing of the run counts until the bytes are those signed
(``Program._payload``). Any failure is ``workloads.base.WorkRefused(code, detail)``, the
same on every honest node.

Output: the final step's outputs as a canonical safetensors file (``out0..``, floats
rounded when ``mantissa_bits`` > 0); the digest is its SHA-256. Runs of more than one
step commit Merkle checkpoints (``workloads.checkpoints``): segments of steps, the state
being the last step's outputs (``workloads.program_run``).
"""

from __future__ import annotations

import binascii
import io
import logging
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pybase64

from schemas.errors import InvalidParams, WorkloadFailed
from workloads.base import (
    ParamSpec,
    Workload,
    WorkloadResult,
    WorkRefused,
    checks_first,
    finish,
)
from workloads.canonical import canonical_json, round_tensor
from workloads.checkpoints import (
    MAX_INLINE_STATE_BYTES,
    Checkpointed,
    split_evenly,
    want_int,
)
from workloads.lazy import torch
from workloads.program_check import (
    MAX_INPUT_BYTES,
    MAX_PROGRAM_BYTES,
    check_archive,
    check_hashes,
    check_shapes,
    check_sizes,
    load_program,
    no_unpickling,
    sha256_hex,
    signature_specs,
)
from workloads.program_cost import MAX_RUNTIME_MS, Estimate, estimate_loaded, runtime_bound_ms
from workloads.program_run import Job, local_run, run_job
from workloads.program_sandbox import run_in_child
from workloads.program_tensors import (
    MAX_TENSORS,
    check_tensors,
    numbered,
    positional,
    read_tensors,
    tensor_bytes,
    write_tensors,
)

log = logging.getLogger(__name__)

MAX_STEPS = 1_000_000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_B64_MAX = 4 * math.ceil(max(MAX_PROGRAM_BYTES, MAX_INPUT_BYTES) / 3)
_MANTISSA = {"float32": 23, "float64": 52, "float16": 10, "bfloat16": 7}


_HASHER: list[ThreadPoolExecutor] = []
_HASHER_LOCK = threading.Lock()


def _hashing() -> ThreadPoolExecutor:
    """The thread that checks payload hashes beside the child (``Program._payload``);
    started on first use, not at import."""
    with _HASHER_LOCK:
        if not _HASHER:
            _HASHER.append(ThreadPoolExecutor(2, thread_name_prefix="program-hash"))
        return _HASHER[0]


def save_program(ep: torch.export.ExportedProgram) -> bytes:
    """The pt2 archive of ``ep`` without its example inputs (which torch pickles), checked
    as a node will check it. ``WorkRefused`` when the archive would be refused."""
    saved = ep._example_inputs
    ep._example_inputs = None
    try:
        buffer = io.BytesIO()
        torch.export.save(ep, buffer)
    finally:
        ep._example_inputs = saved
    data = buffer.getvalue()
    check_archive(data)
    return data


def save_inputs(tensors: Sequence[torch.Tensor]) -> bytes:
    """The input file of a program taking ``tensors`` positionally (``in0..``)."""
    return write_tensors(numbered("in", list(tensors)))


def read_outputs(data: bytes) -> list[torch.Tensor]:
    """The outputs in a result file (what ``destra result`` writes), in order."""
    return positional("out", read_tensors(data))


def local_output(program: bytes, inputs: bytes, *, steps: int = 1, carry: int = 0,
                 mantissa_bits: int = 0, device: str = "cpu") -> bytes:
    """The result file the nodes return for this task (``read_outputs`` reads it), computed
    in this process without the child's limits: what a submitter compares a result with.
    Bit-equal to a node's only on the same device class (exact) or to ``mantissa_bits``."""
    outs = local_run(program, inputs, steps=steps, carry=carry, device=device)
    return _result_file(outs, mantissa_bits)


def estimate(program: bytes, inputs: bytes, steps: int = 1, carry: int = 0) -> Estimate:
    """Check the program as a node will and estimate its cost (``workloads.program_cost``).

    Loads the program in this process (the submitter's own program). ``WorkRefused``
    for any check failure; ``InvalidParams`` for steps or carry out of range."""
    if not 1 <= steps <= MAX_STEPS or not 0 <= carry <= MAX_TENSORS:
        raise InvalidParams(f"program: steps {steps} must be in [1, {MAX_STEPS}] and "
                            f"carry {carry} in [0, {MAX_TENSORS}]")
    check_sizes(program, inputs)
    ep = load_program(program)
    ins, outs = signature_specs(ep)
    given = positional("in", read_tensors(inputs))
    check_shapes(ins, outs, given, carry)
    with no_unpickling():
        return estimate_loaded(ep, given, steps)


def program_params(program: bytes, inputs: bytes, *, steps: int = 1, carry: int = 0,
                   mantissa_bits: int = 0, max_runtime_ms: int = 0) -> dict[str, str]:
    """The full parameter map (public and private) of a task running ``program``.

    ``max_runtime_ms``: a wall-clock bound tighter than the rule's for the measured units
    (0: the rule's); ``InvalidParams`` when looser."""
    if not 0 <= mantissa_bits <= 52:
        raise InvalidParams(f"program: mantissa_bits {mantissa_bits} must be in [0, 52]")
    est = estimate(program, inputs, steps, carry)
    if not 0 <= max_runtime_ms <= est.max_runtime_ms:
        raise InvalidParams(f"program: max_runtime_ms {max_runtime_ms} must be in [0, "
                            f"{est.max_runtime_ms}], the bound for its {est.units} units")
    params = {
        "program_sha256": sha256_hex(program), "input_sha256": sha256_hex(inputs),
        "units": str(est.units), "memory_mb": str(est.memory_mb), "steps": str(steps),
        "carry": str(carry), "mantissa_bits": str(mantissa_bits),
        "max_runtime_ms": str(max_runtime_ms or est.max_runtime_ms),
        "program": pybase64.b64encode(program).decode("ascii"),
        "input": pybase64.b64encode(inputs).decode("ascii"),
    }
    PROGRAM.validate(params)
    return params


def _decode(params: Mapping[str, Any], name: str) -> bytes:
    """Parameter ``name``'s bytes: as they came from the sealed payload, or decoded from
    base64 text. pybase64 (SIMD): the stdlib decoded 64 MB of base64 in 400 ms here,
    pybase64 in 28 ms; both refuse a character outside the alphabet."""
    if isinstance(params[name], bytes):
        return params[name]
    try:
        return pybase64.b64decode(params[name], validate=True)
    except (binascii.Error, ValueError) as e:
        code = "bad-input" if name == "input" else "bad-program"
        raise WorkRefused(code, f"parameter {name!r} is not base64: {e}") from None


def _round(t: torch.Tensor, bits: int) -> torch.Tensor:
    """``t`` with floats rounded to ``bits`` mantissa bits (capped at the dtype's);
    half-precision floats are rounded through float32, which holds them exactly."""
    name = str(t.dtype).removeprefix("torch.")
    if bits == 0 or name not in _MANTISSA:
        return t
    keep = min(bits, _MANTISSA[name])
    try:
        if t.dtype in (torch.float32, torch.float64):
            return round_tensor(t, keep)
        return round_tensor(t.to(torch.float32), keep).to(t.dtype)
    except WorkloadFailed as e:
        raise WorkRefused("program-failed", f"an output holds NaN: {e}") from None


def _result_file(tensors: Sequence[torch.Tensor], bits: int) -> bytes:
    """The canonical output file: the tensors on the CPU, floats rounded to ``bits``."""
    return write_tensors(numbered("out", [_round(t.detach().to("cpu"), bits) for t in tensors]))


RECORDED_STATE_BYTES = MAX_INLINE_STATE_BYTES // 2
"""A state whose tensors hold more bytes than this is not recorded (``ProgramState``): its
exact encoding (base64 in JSON, a third larger) could not travel inline in a dispute."""


@dataclass(frozen=True)
class ProgramState:
    """After ``step`` steps: the outputs of that step (``out``), or, at step 0, the
    carried inputs (``in``); ``bits`` = the task's mantissa_bits (leaves round by it);
    ``size`` = the bytes of those tensors.

    A state of more than ``RECORDED_STATE_BYTES`` is *unrecorded*: no dispute can carry
    it to a referee (``MAX_INLINE_STATE_BYTES``), so a replica's leaf for it names only
    its step and size (``leaf_bytes``), the same on every replica whatever the values,
    and a disagreement on such a task goes to full rounds (the verifier finds no
    divergent leaf). Recording it would only cost time: hashing 64 states of 16 MiB took
    longer than the task's own 2.5 s of steps. The child then does not even send it
    back (``tensors`` is empty), except the last state of a run, which the next run or
    the result continues from."""

    step: int
    tensors: tuple[torch.Tensor, ...]
    bits: int
    size: int
    file: bytes | None = None
    """The child's tensor file of ``tensors`` (``out0..``), when it came from one: with
    exact digests (``bits`` = 0) it is the result file already."""

    @property
    def recorded(self) -> bool:
        """Whether the state is small enough to be recorded (and a dispute to carry it)."""
        return self.size <= RECORDED_STATE_BYTES

    @property
    def prefix(self) -> str:
        """Name prefix of the tensors: ``in`` at step 0, else ``out``."""
        return "in" if self.step == 0 else "out"


class Program(Workload, Checkpointed):
    """A user's exported PyTorch program, checked, bounded and run in a child process."""

    name = "program"
    doc = ("A submitter's own torch.export program (pt2, no pickle, allowlisted ATen ops) "
           "on a safetensors input, iterated `steps` times with the first `carry` outputs "
           "fed back; output = the last step's outputs as safetensors. Exact digest "
           "(same device class) unless `mantissa_bits` > 0.")
    params = (
        ParamSpec(name="program_sha256", kind="str", default="0" * 64, public=True,
                  doc="SHA-256 (hex) of the .pt2 archive"),
        ParamSpec(name="input_sha256", kind="str", default="0" * 64, public=True,
                  doc="SHA-256 (hex) of the input .safetensors"),
        ParamSpec(name="units", kind="int", default=1, min=1, max=10**13, public=True,
                  doc="compute units of the whole run (from the graph, by the client)"),
        ParamSpec(name="memory_mb", kind="int", default=1, min=1, max=2**20, public=True,
                  doc="peak memory in MiB (from the shapes, by the client)"),
        ParamSpec(name="steps", kind="int", default=1, min=1, max=MAX_STEPS, public=True,
                  doc="times the program runs"),
        ParamSpec(name="carry", kind="int", default=0, min=0, max=MAX_TENSORS, public=True,
                  doc="leading outputs fed back as the leading inputs of the next step"),
        ParamSpec(name="mantissa_bits", kind="int", default=0, min=0, max=52, public=True,
                  doc="0: exact digest; else floats rounded to this many mantissa bits"),
        ParamSpec(name="max_runtime_ms", kind="int", default=0, min=0, max=MAX_RUNTIME_MS,
                  public=True, doc="wall-clock bound; 0: the rule's for `units`"),
        ParamSpec(name="program", kind="bytes", default="", max_len=_B64_MAX,
                  doc="base64 of the .pt2 archive (sealed)"),
        ParamSpec(name="input", kind="bytes", default="", max_len=_B64_MAX,
                  doc="base64 of the input .safetensors (sealed)"),
    )
    bit_exact = False
    digest_bits = 0
    _checked: tuple[tuple[str, ...], tuple[bytes, bytes, Future[None]]] | None = None

    def check(self, params: dict[str, Any]) -> None:
        """Hashes are 64 lower-case hex; a stated bound is within the rule's."""
        for name in ("program_sha256", "input_sha256"):
            if not _HEX64.fullmatch(params[name]):
                raise InvalidParams(f"{self.name}: parameter {name!r} must be 64 lower-case "
                                    "hex digits")
        rule = runtime_bound_ms(params["units"])
        if params["max_runtime_ms"] > rule:
            raise InvalidParams(f"{self.name}: max_runtime_ms {params['max_runtime_ms']} "
                                f"exceeds {rule}, the bound for {params['units']} units")

    def homogeneous(self, params: dict[str, Any]) -> bool:
        """Exact digests (``mantissa_bits`` = 0) need replicas of one device class."""
        return bool(params["mantissa_bits"] == 0)

    def compute_units(self, params: dict[str, Any]) -> int:
        """The declared ``units`` (measured from the graph by the submitter's client)."""
        return int(params["units"])

    def memory_mb(self, params: dict[str, Any]) -> int:
        """The declared ``memory_mb``."""
        return int(params["memory_mb"])

    def wall_bound_ms(self, params: dict[str, Any]) -> int:
        """The wall-clock bound the task states, where the child is killed
        (``runtime-bound``): ``max_runtime_ms``, or the rule's."""
        return int(params["max_runtime_ms"]) or runtime_bound_ms(params["units"])

    def payload(self, params: dict[str, Any]) -> tuple[bytes, bytes]:
        """The program and input bytes, after the size, archive and tensor-header checks;
        their hashes are being checked meanwhile (``_payload``)."""
        program, inputs, _ = self._payload(params)
        return program, inputs

    def _payload(self, params: dict[str, Any]) -> tuple[bytes, bytes, Future[None]]:
        """``payload`` and the check of its hashes against the signed ones
        (``check_hashes``), running on another thread: ``result()`` raises ``bad-hash``.

        Everything a node publishes about a program task comes out of ``_child``, which
        waits for that check before it returns or raises, so no result of bytes other
        than those signed leaves the node; the child meanwhile runs speculatively (it is
        sandboxed for untrusted programs anyway: the hash decides which program counts,
        not whether it is safe to run), and is killed as soon as the check fails
        (``run_in_child``'s ``abandon``): a submitter who signs other bytes than it
        seals costs the nodes the hashing time, not the task's bound. Hashing the CNN
        example's 48 MiB input took 45 ms here, before the child could start; it now
        overlaps the child's run. A refusal of a checked part yields to ``bad-hash`` when
        the bytes are not those signed, so every honest replica refuses tampered bytes
        alike.

        The last task's are kept (``_checked``, with the very parameter strings they came
        from, so the key cannot be reused by other strings): a replica asks twice, for
        the initial state and for the child, and decoding and checking 20 MiB costs some
        tens of ms each time."""
        key = (params["program"], params["input"], params["program_sha256"],
               params["input_sha256"])
        kept = self._checked
        if kept is not None and all(a is b for a, b in zip(kept[0], key, strict=True)):
            return kept[1]
        program, inputs = _decode(params, "program"), _decode(params, "input")
        hashed = _hashing().submit(check_hashes, program, inputs, params["program_sha256"],
                                   params["input_sha256"])
        with checks_first([hashed], wait=False):  # bad-hash, if so, is the reason
            check_sizes(program, inputs)
            check_archive(program)
            check_tensors(inputs)
        self._checked = (key, (program, inputs, hashed))
        return program, inputs, hashed

    def _child(self, params: dict[str, Any], device: torch.device, start: ProgramState,
               boundaries: tuple[int, ...]) -> list[ProgramState]:
        """Run from ``start`` to each boundary in a child; the state at each, unrecorded
        states without their tensors except the last (``ProgramState``)."""
        if start.step > 0 and len(start.tensors) < params["carry"]:
            raise InvalidParams(f"{self.name}: the state after step {start.step} was not "
                                "kept: a run cannot continue from it")
        program, inputs, hashed = self._payload(params)
        # At step 0 the child starts from the input file it is sent anyway: the state
        # there is the input's first ``carry`` tensors (``initial_state``), and sending
        # them again cost a second copy of them (16 MiB for the 1024^2 wave).
        state = (None if start.step == 0
                 else write_tensors(numbered(start.prefix, list(start.tensors))))
        job = Job(program=program, inputs=inputs, device=str(device), carry=params["carry"],
                  start_step=start.step, start_state=state, boundaries=boundaries,
                  record_bytes=RECORDED_STATE_BYTES,
                  declared=(params["units"], params["memory_mb"], params["steps"]))
        with checks_first([hashed]):  # nothing of a run leaves unless it ran the signed bytes
            reply = run_in_child(run_job, job, device=str(device),
                                 memory_mb=params["memory_mb"],
                                 bound_ms=self.wall_bound_ms(params),
                                 threads=torch.get_num_threads(), abandon=hashed)
        timing = reply.facts.get("timing")
        if isinstance(timing, dict):
            log.info("program child, steps %d-%d: checks %s s, step loop %s s, writing "
                     "states %s s, %s page faults, huge pages %s", start.step, boundaries[-1],
                     timing.get("check_s"), timing.get("loop_s"), timing.get("write_s"),
                     timing.get("minflt"), "on" if timing.get("huge_pages") else "off")
        sizes = reply.facts.get("sizes")
        states = []
        for b in boundaries:
            size = sizes.get(f"s{b}") if isinstance(sizes, dict) else None
            blob = reply.blobs.get(f"s{b}")
            if type(size) is not int or (blob is None and (b == boundaries[-1]
                                                           or size <= RECORDED_STATE_BYTES)):
                raise WorkRefused("program-failed", f"the child's reply lacks step {b}")
            tensors = () if blob is None else tuple(positional("out", read_tensors(blob)))
            states.append(ProgramState(b, tensors, params["mantissa_bits"], size, blob))
        return states

    def run(self, params: dict[str, Any], device: torch.device) -> WorkloadResult:
        """All steps in one child; the final outputs, canonical and digested."""
        started = time.perf_counter_ns()
        start = ProgramState(0, (), params["mantissa_bits"], 0)
        final = self._child(params, device, start, (params["steps"],))[-1]
        return self.final_result(params, final, device, started)

    # ------------------------------------------------------------------ checkpoints

    def segments(self, params: dict[str, Any]) -> int:
        """ceil(steps / k) segments of k = ceil(steps / 64) steps."""
        return split_evenly(params["steps"])[1]

    def segment_units(self, params: dict[str, Any]) -> int:
        """The declared units pro rata for k steps."""
        k = split_evenly(params["steps"])[0]
        return max(1, math.ceil(params["units"] * k / params["steps"]))

    def segment_ends(self, params: dict[str, Any]) -> tuple[int, ...]:
        """The step after which each segment ends, in order (a child's boundaries)."""
        return tuple(self._end(params, s) for s in range(self.segments(params)))

    def _end(self, params: dict[str, Any], segment: int) -> int:
        k = split_evenly(params["steps"])[0]
        return min((segment + 1) * k, params["steps"])

    def initial_state(self, params: dict[str, Any], device: torch.device) -> ProgramState:
        """The first ``carry`` inputs, read (not run) from the checked input file; only
        their size when that leaves them unrecorded (the child starts from the input file
        itself, and the leaf names the size): reading them was a copy of the input for
        nothing (48 MiB for the CNN example, which carries none, 30 ms).

        Its hashes may still be being checked (``_payload``): a refusal here yields to
        ``bad-hash``, and the state counts for nothing until a child has run."""
        _, inputs, hashed = self._payload(params)
        carry = params["carry"]
        with checks_first([hashed], wait=False):  # bad-hash, if so, is the reason
            size = sum(positional("in", check_tensors(inputs))[:carry])
            if size > RECORDED_STATE_BYTES or carry == 0:
                return ProgramState(0, (), params["mantissa_bits"], size)
            carried = positional("in", read_tensors(inputs))[:carry]
        return ProgramState(0, tuple(carried), params["mantissa_bits"], tensor_bytes(carried))

    def advance(self, params: dict[str, Any], state: ProgramState, segment: int,
                device: torch.device) -> ProgramState:
        """One segment in a child."""
        return self.advance_many(params, state, range(segment, segment + 1), device)[0]

    def advance_many(self, params: dict[str, Any], state: ProgramState, segments: range,
                     device: torch.device) -> list[ProgramState]:
        """Consecutive segments in one child, the state at each segment's end."""
        k = split_evenly(params["steps"])[0]
        if not segments or state.step != segments[0] * k:
            raise InvalidParams(f"{self.name}: the state after step {state.step} is not "
                                f"the pre-state of segment {segments.start}")
        return self._child(params, device, state, tuple(self._end(params, s) for s in segments))

    def state_fields(self, state: ProgramState) -> dict[str, int | torch.Tensor]:
        """``step``, ``bits`` and the tensors by name; ``InvalidParams`` for a state whose
        tensors were not kept."""
        if state.step > 0 and not state.tensors:
            raise InvalidParams(f"{self.name}: the state after step {state.step} was not kept")
        fields: dict[str, int | torch.Tensor] = {"step": state.step, "bits": state.bits}
        fields.update(numbered(state.prefix, list(state.tensors)))
        return fields

    def state_bytes(self, state: ProgramState) -> bytes:
        """The exact encoding; empty for an unrecorded state (``ProgramState``)."""
        return super().state_bytes(state) if state.recorded else b""

    def leaf_bytes(self, state: ProgramState) -> bytes:
        """The rounded encoding; for an unrecorded state, its step and size only."""
        if state.recorded:
            return super().leaf_bytes(state)
        return canonical_json({"checkpoint": 1, "unrecorded": {"size": state.size,
                                                               "step": state.step}})

    def leaf_bits(self, fields: Mapping[str, Any]) -> int | None:
        """The task's mantissa_bits, which the state carries (0: exact leaves)."""
        bits = fields.get("bits")
        return bits if isinstance(bits, int) and 0 < bits <= 52 else None

    def state_from_fields(self, params: dict[str, Any], fields: dict[str, Any],
                          device: torch.device) -> ProgramState:
        """Check names and counts; shapes are checked by the child that resumes it."""
        step = want_int(fields, "step", 0, params["steps"])
        bits = want_int(fields, "bits", 0, 52)
        if bits != params["mantissa_bits"]:
            raise InvalidParams(f"{self.name}: state rounds to {bits} bits, the task to "
                                f"{params['mantissa_bits']}")
        named = {k: v for k, v in fields.items() if k not in ("step", "bits")}
        if not all(isinstance(v, torch.Tensor) for v in named.values()):
            raise InvalidParams(f"{self.name}: checkpoint fields must be tensors")
        try:
            tensors = positional("in" if step == 0 else "out", named)
        except WorkRefused as e:
            raise InvalidParams(f"{self.name}: {e.detail}") from None
        if (step == 0 and len(tensors) != params["carry"]) or len(tensors) < params["carry"]:
            raise InvalidParams(f"{self.name}: a state holds {len(tensors)} tensors, "
                                f"carry is {params['carry']}")
        return ProgramState(step, tuple(t.to(device) for t in tensors), bits, tensor_bytes(tensors))

    def final_result(self, params: dict[str, Any], state: ProgramState,
                     device: torch.device, started_ns: int | None = None) -> WorkloadResult:
        """The last step's outputs, rounded per ``mantissa_bits``, as canonical safetensors."""
        started = time.perf_counter_ns() if started_ns is None else started_ns
        if state.step != params["steps"]:
            raise InvalidParams(f"{self.name}: the state after step {state.step} is not final")
        output = (state.file if state.file is not None and params["mantissa_bits"] == 0
                  else _result_file(state.tensors, params["mantissa_bits"]))
        summary = {"steps": state.step, "outputs": [f"{str(t.dtype)[6:]}{list(t.shape)}"
                                                    for t in state.tensors]}
        return finish(output, summary, started, device)


PROGRAM = Program()
"""The registered instance."""
