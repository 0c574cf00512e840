"""What every workload declares: parameters with bounds, cost estimates, and a canonical result.

One compute unit is 10^6 floating-point operations (1 MFLOP) or, for hash workloads, 10^6
integer operations of the hash's compression function. Estimates count the arithmetic of
the dominant kernels only; they are for pricing and placement, not for timing.
"""

from __future__ import annotations

import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from destra.errors import DestraError, InvalidParams
from workloads.canonical import sha256
from workloads.lazy import torch

OPS_PER_UNIT = 1_000_000
_MAX_STR_LEN = 1024
_INT_RE = re.compile(r"-?[0-9]+")


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One parameter of a workload, as it arrives in a task's ``map<string, string>``."""

    name: str
    """Key in the task's parameter map."""
    kind: Literal["int", "float", "str", "bytes"]
    """How the string value is parsed. ``bytes``: raw bytes where the transport carries
    them (the sealed payload, ``destra.confidential``), else standard base64 text; the
    workload decodes the text (``max_len`` bounds the text; bytes, its 3/4)."""
    default: int | float | str
    """Value used when the task leaves the parameter out."""
    min: int | float | None = None
    """Smallest allowed value (inclusive), for ``int`` and ``float``."""
    max: int | float | None = None
    """Largest allowed value (inclusive), for ``int`` and ``float``."""
    choices: tuple[str, ...] = ()
    """Allowed values of a ``str`` parameter; empty means the workload checks it itself."""
    doc: str = ""
    """One line for `destra workloads` and the submitter."""
    max_len: int = _MAX_STR_LEN
    """Longest value of a ``str`` parameter (a user program travels base64 in one)."""
    public: bool = False
    """Sent in the clear: the task's cost and memory depend on it, so the ledger and the
    allocator must read it. Every other parameter travels in the encrypted payload."""

    def allowed(self) -> str:
        """The allowed values in words, for error messages."""
        if self.kind == "bytes":
            return f"bytes, or their base64 (at most {self.max_len} characters)"
        if self.kind == "str":
            return f"one of {', '.join(self.choices)}" if self.choices else "a string"
        return f"{self.kind} in [{self.min}, {self.max}]"

    def parse(self, workload: str, raw: str | bytes) -> int | float | str | bytes:
        """Parse and bound-check ``raw``; raise ``InvalidParams`` naming the parameter."""
        def bad(why: str) -> InvalidParams:
            shown = repr(raw) if len(raw) <= 80 else f"{repr(raw[:60])}... ({len(raw)} long)"
            return InvalidParams(
                f"{workload}: parameter {self.name!r} = {shown} {why}; allowed: "
                f"{self.allowed()}")

        if self.kind == "bytes" and isinstance(raw, bytes):
            if len(raw) > self.max_len * 3 // 4:
                raise bad(f"is longer than {self.max_len * 3 // 4} bytes")
            return raw
        if not isinstance(raw, str):
            raise bad("is not a string")
        value: int | float | str
        if self.kind == "int":
            if not _INT_RE.fullmatch(raw):
                raise bad("is not an integer")
            try:
                value = int(raw)
            except ValueError:  # more digits than Python converts (4,300)
                raise bad("has too many digits") from None
        elif self.kind == "float":
            try:
                value = float(raw)
            except ValueError:
                raise bad("is not a number") from None
            if not math.isfinite(value):
                raise bad("is not a finite number")
        else:
            if self.choices and raw not in self.choices:
                raise bad("is not allowed")
            if len(raw) > self.max_len:
                raise bad(f"is longer than {self.max_len} characters")
            return raw
        if (self.min is not None and value < self.min) or (
                self.max is not None and value > self.max):
            raise bad("is out of range")
        return value


@dataclass(frozen=True)
class WorkloadResult:
    """What a run hands back: canonical output bytes, their digest, and figures for people."""

    output: bytes
    """Canonical serialized output the submitter gets back (deterministic given rounding)."""
    digest: bytes
    """SHA-256 of ``output`` (32 bytes): what replicas commit to and the verifier compares."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Human-readable figures (accuracy, energy drift, timing); never hashed."""
    runtime_ms: int = 0
    """Wall-clock time of the run; never hashed."""


RUNTIME_BOUND = "runtime-bound"
"""The refusal of a node that stopped a task at its wall-clock bound (``wall_bound_ms``)."""


class WorkRefused(DestraError):
    """The task itself cannot be run, and any honest node would say so identically: a
    user program that fails its checks, or one stopped at the runtime bound its quote
    stated. ``run()`` raises it; the replicas then reveal the refusal (its ``code``) in
    place of a result, and a quorum agreeing on it fails the task with a refund, nobody
    penalized. ``code`` is a short ``word-like-this``; ``detail`` is for people."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class Workload(ABC):
    """A seeded, deterministic PyTorch computation that nodes run for submitters."""

    name: str
    """Registry key, as written in ``TaskSubmitted.workload``."""
    doc: str
    """What it computes, its precision and why."""
    params: tuple[ParamSpec, ...]
    """Declared parameters, in display order."""
    bit_exact: bool
    """True when replicas must run on the same hardware class to agree."""
    digest_bits: int
    """Explicit mantissa bits kept when rounding floats before hashing (0: output is exact)."""
    uses_accelerator: bool = True
    """False when the work runs on the host CPU whatever the device (placement then
    cannot expect a GPU's speed from it)."""

    def validate(self, raw: Mapping[str, str | bytes]) -> dict[str, Any]:
        """Parse string parameters, fill defaults, check bounds; reject unknown names."""
        known = {spec.name: spec for spec in self.params}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InvalidParams(
                f"{self.name}: unknown parameter {unknown[0]!r}; known: {', '.join(known)}")
        parsed = {name: spec.parse(self.name, raw[name]) if name in raw else spec.default
                  for name, spec in known.items()}
        self.check(parsed)
        return parsed

    def homogeneous(self, params: dict[str, Any]) -> bool:
        """Whether a task with these (validated) parameters must run on one device class
        to agree. Default: ``bit_exact``; a user program decides by its precision rule."""
        return self.bit_exact

    def public_names(self) -> frozenset[str]:
        """Parameters sent in the clear: those ``compute_units`` and ``memory_mb`` read."""
        return frozenset(spec.name for spec in self.params if spec.public)

    def byte_names(self) -> frozenset[str]:
        """The parameters of kind ``bytes``: sealed as raw bytes (``seal_input``)."""
        return frozenset(spec.name for spec in self.params if spec.kind == "bytes")

    def split(self, raw: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """``(public, private)`` parts of a raw parameter map.

        Only the public part goes into ``TaskSubmitted.params``; the private part (seeds,
        learning rates, search prefixes...) is sealed into the payload for the assigned
        nodes. A workload's cost may depend on public parameters only.
        """
        names = self.public_names()
        return ({k: v for k, v in raw.items() if k in names},
                {k: v for k, v in raw.items() if k not in names})

    def check(self, params: dict[str, Any]) -> None:
        """Rules spanning parameters or string formats; raise ``InvalidParams``. Default: none."""
        return None  # Most workloads' bounds are all per-parameter.

    def defaults(self) -> dict[str, Any]:
        """The parsed default parameters."""
        return self.validate({})

    @abstractmethod
    def compute_units(self, params: dict[str, Any]) -> int:
        """Estimated work in units of 10^6 operations (>= 1)."""

    def wall_bound_ms(self, params: dict[str, Any]) -> int:
        """The wall-clock bound a node stops this task at, refusing it ``runtime-bound``
        (0: none). The verifier does not judge a replica stopped there against one that
        finished in time (``verifier.proof_of_sync``)."""
        return 0

    @abstractmethod
    def memory_mb(self, params: dict[str, Any]) -> int:
        """Estimated peak tensor memory in MiB (>= 1), excluding the PyTorch runtime."""

    @abstractmethod
    def run(self, params: dict[str, Any], device: torch.device) -> WorkloadResult:
        """Run on ``device`` with validated ``params``; the digest never depends on timing."""


def units(ops: float) -> int:
    """Operation count -> compute units, rounded up, at least 1."""
    return max(1, math.ceil(ops / OPS_PER_UNIT))


def mebibytes(nbytes: float) -> int:
    """Byte count -> MiB, rounded up, at least 1."""
    return max(1, math.ceil(nbytes / 2**20))


def cpu_generator(seed: int) -> torch.Generator:
    """A generator for every random draw of a run.

    Draws happen on the CPU and the tensors are then moved to the device: CUDA's Philox
    stream differs from the CPU's Mersenne Twister, so drawing on the device would give
    CPU and GPU replicas different inputs.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels and full-precision float32 matmul for one run; restored after.

    Touches process-wide torch settings, so a process runs one workload at a time.
    """
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        # cuBLAS refuses deterministic mode without a fixed workspace configuration.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    # TF32 would drop float32 inputs to 10 mantissa bits on Ampere+ GPUs only.
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
        torch.set_float32_matmul_precision(precision)


@contextmanager
def checks_first(checks: list[Future[Any]], *, wait: bool = True
                 ) -> Iterator[list[Future[Any]]]:
    """Work beside checks running on other threads: ``checks``, and any the block appends
    to the list it is given. Should the block raise, each check's error is raised instead
    (the bytes were not the ones named: that is the reason, whatever else failed); with
    ``wait``, a block that completes waits for the checks too, and a failed one discards
    what it made. Used for the blob a node fetched (``blobs.check``) and a program's
    signed hashes (``Program._payload``)."""
    try:
        yield checks
    except BaseException:
        for check in checks:
            check.result()
        raise
    if wait:
        for check in checks:
            check.result()


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finish(output: bytes, summary: dict[str, Any], started_ns: int,
           device: torch.device) -> WorkloadResult:
    """Build the result: digest = SHA-256(output), runtime since ``started_ns``."""
    sync(device)
    runtime_ms = (time.perf_counter_ns() - started_ns) // 1_000_000
    return WorkloadResult(output=output, digest=sha256(output), summary=summary,
                          runtime_ms=int(runtime_ms))


def seed_spec() -> ParamSpec:
    """The ``seed`` parameter shared by every randomized workload."""
    return ParamSpec(name="seed", kind="int", default=0, min=0, max=2**31 - 1,
                     doc="seed of every random draw")
