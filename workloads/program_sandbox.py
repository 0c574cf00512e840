"""Running a user program in a child process, with a wall-clock bound and a memory limit.

Why a child: a program that runs past its bound must be stopped, and a thread cannot be
stopped inside an ATen kernel; a process can be killed. A crash in a kernel (or a
memory blow-up) takes down the child, not the node.

Warm children: a fresh interpreter pays about 2-3 s to import torch. The children come
from a ``multiprocessing`` forkserver whose server process has torch and the program
loader imported (``PRELOAD``); each task gets a *fresh* child forked from it (about
20 ms here), so no state leaks from one task's program to the next. The server starts on
the first task (that one pays the import once), or earlier with ``warm_up()``.

Limits in the child:

- CPU: ``RLIMIT_AS`` = the child's address space at start + ``MEMORY_FACTOR`` x the
  declared ``memory_mb`` + ``MEMORY_SLACK_MB``. (Address space, not resident memory:
  torch maps far more than it touches, hence the measured start and the slack.) An
  allocation past it fails; the child reports ``memory-limit``.
- CUDA: ``RLIMIT_AS`` would break the driver, which maps huge virtual ranges, so it is
  not set; instead ``torch.cuda.set_per_process_memory_fraction`` caps the caching
  allocator at ``MEMORY_FACTOR`` x ``memory_mb`` + ``MEMORY_SLACK_MB`` of the card. The
  host side is then unbounded by us (the node's own cgroup, if any, still applies). A
  CUDA child also pays the CUDA context's creation once per task (not measured here: no
  GPU on the development machine).
- Memory layout: glibc keeps freed tensors' memory for reuse (``_keep_freed_memory``),
  and torch asks for transparent huge pages for tensors of 2 MiB or more
  (``SERVER_ENVIRONMENT``): a fresh process would otherwise fault in and scatter its
  reused tensors' pages anew. A program that makes tensors too large for glibc's reuse
  gets them from the heap as well, without huge pages (``large_tensors_from_the_heap``).
- Threads: the calling thread's torch thread count (a node's ``--threads``), which the
  forkserver, started with torch's default, would not pass on.
- Wall clock: the parent waits ``bound_ms`` from the moment the child says it has
  started (so the forkserver's one-time start is not charged to a task), then kills it:
  ``WorkRefused("runtime-bound")``.

The job and the reply travel through anonymous in-memory files (``_Shared``), not the
pipe, which carries only "started" and "replied". A child that has replied is reaped on
a thread while the node goes on.

What the child sends back is parsed, not unpickled (``_decode_reply``): a child whose
program broke it cannot attack the parent through the reply.

This is isolation from accidents and runaway programs, not a security sandbox: the
child is an ordinary process of the node's user, with the node's files and network. A
memory-safety bug in an ATen kernel reachable from an allowed op could be exploited by
a crafted program; the allowlist and the absence of pickle and Python code narrow what a
submitter controls to tensor values, shapes and the choice of listed ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import multiprocessing
import os
import pickle
import resource
import struct
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing import context, popen_forkserver, reduction, spawn
from multiprocessing.connection import Connection
from typing import Any

from workloads.base import RUNTIME_BOUND, WorkRefused

MEMORY_FACTOR = 2
"""Declared memory is multiplied by this for the limit: the declaration is an estimate."""
MEMORY_SLACK_MB = 1024
"""Added to the limit: allocator caches, thread stacks and arenas, kernels' workspaces."""
ABANDON_POLL_S = 0.02
"""How often ``run_in_child`` looks at a check running beside the child (``abandon``)."""
MAX_REPLY_BYTES = 1 << 31
"""Largest reply read from a child."""
PRELOAD = ("torch", "torch.export", "torch._export.serde.serialize",
           "torch.export.pt2_archive._package", "torch._subclasses.fake_tensor",
           "torch.utils.flop_counter", "workloads.program_run")
"""Imported once by the forkserver, so every child starts with them."""

_context: Any = None
_launching = threading.Lock()


def _ctx() -> Any:
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        _context = ctx
    return _context


SERVER_ENVIRONMENT = {"THP_MEM_ALLOC_ENABLE": "1"}
"""Set for the forkserver (so for every child), not for the node. torch then page-aligns
CPU tensors and asks for transparent huge pages (``madvise``) for those of 2 MiB or more:
with them, a fresh child's memory-bound step over 8 MiB tensors ran as fast as a warm
process's (10.3-10.5 ms a step for the 1024^2 wave against 10.1-12.5 without, varying
with where its pages landed); fewer TLB misses and page faults."""


REUSED_BYTES = 32 * 2**20
"""glibc's largest ``M_MMAP_THRESHOLD``: tensors up to this size come from the heap and
are reused step after step (``_keep_freed_memory``); larger ones are mapped afresh at
each allocation, unless ``large_tensors_from_the_heap``."""

in_child = False
"""True in a sandbox child (``_child_main``), where ``large_tensors_from_the_heap``
acts; False in the node and in a submitter's local run."""


def large_tensors_from_the_heap(largest_tensor_bytes: int) -> bool:
    """In a child, for a program that makes tensors over ``REUSED_BYTES``: take them from
    the heap too (``mallopt(M_MMAP_MAX, 0)``), where freed ones are reused, and turn
    transparent huge pages off (``prctl(PR_SET_THP_DISABLE)``); True when it did.

    glibc maps each allocation over ``REUSED_BYTES`` afresh and unmaps it when freed, so
    every such tensor is faulted in anew, a page at a time: the CNN example (512 MiB
    activations) faulted 770,000 times in its 2.5 s forward pass. From the heap, a freed
    activation's memory serves the next one: 330,000 faults, and 1.85-2.05 s against
    2.49-2.50 s (its resident peak 2.0 GiB against 1.75, within the limit's
    ``MEMORY_FACTOR``). Huge pages cost most where memory is touched for the first time,
    which the heap still is here once per run: the same forward pass ran 4.9-6.0 s with
    them, mapped or from the heap; the 1024^2 wave (8 MiB tensors, reused) runs steadily
    faster with them. (A thread's own arena still maps what it cannot hold: glibc falls
    back to ``mmap`` there, whatever ``M_MMAP_MAX`` says.)"""
    if not in_child or largest_tensor_bytes <= REUSED_BYTES:
        return False
    _libc_call("mallopt", -4, 0)  # M_MMAP_MAX: no allocation is mapped on its own
    return _libc_call("prctl", 41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE


def _libc_call(name: str, *args: int) -> int | None:
    """``name(*args)`` from the C library; None where it or the function is missing
    (not glibc, not Linux)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return int(getattr(libc, name)(*args))
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _server_environment() -> Iterator[None]:
    """``SERVER_ENVIRONMENT`` in ``os.environ`` while a launch may start the forkserver
    (it inherits the environment of its first launch), restored after."""
    saved = {name: os.environ.get(name) for name in SERVER_ENVIRONMENT}
    os.environ.update(SERVER_ENVIRONMENT)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _MainlessPopen(popen_forkserver.Popen):
    """A forkserver launch that does not re-run the parent's ``__main__`` in the child.

    ``multiprocessing`` re-imports the main script (or ``-m`` module) in every child so
    that functions defined there unpickle; ours live in ``workloads``, and re-running a
    node's or a benchmark's main module would cost time per task (or start processes).
    The launch drops those two entries from the preparation data (the stdlib reads it
    through ``spawn.get_preparation_data``, replaced for the launch, under a lock)."""

    def _launch(self, process_obj: Any) -> None:
        original = spawn.get_preparation_data

        def mainless(name: str) -> dict[str, Any]:
            data = original(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        with _launching, _server_environment():
            spawn.get_preparation_data = mainless
            try:
                super()._launch(process_obj)  # type: ignore[misc]
            finally:
                spawn.get_preparation_data = original


class _Process(context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _MainlessPopen(process_obj)


@dataclass(frozen=True)
class Reply:
    """A child's answer: named byte blobs and small JSON facts."""

    facts: dict[str, Any]
    blobs: dict[str, bytes]


def encode_reply(facts: dict[str, Any], blobs: dict[str, bytes]) -> list[bytes]:
    """``u32 json length, JSON {facts, sizes}, blobs in sizes' order`` (child side), as
    the parts to write one after another (not joined: a copy of every blob saved)."""
    head = json.dumps({"facts": facts, "sizes": [[k, len(v)] for k, v in blobs.items()]},
                      sort_keys=True).encode("utf-8")
    return [struct.pack("<I", len(head)), head, *blobs.values()]


class _Shared:
    """An anonymous file (``memfd``) handed to the child by descriptor: the job and the
    reply travel through it instead of the pipe, as one copy into shared memory each way.
    Through the pipe, the 16 MiB input of the 1024^2 wave took 20-50 ms to send and its
    16 MiB final state 25-40 ms to receive, in 64 KiB turns between the two processes.

    Pickled, it becomes ``DupFd`` of the descriptor, which the forkserver passes to the
    child over its Unix socket with the pipe's own end."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_shared, (reduction.DupFd(self.fd),)


def _rebuild_shared(dup: Any) -> _Shared:
    return _Shared(dup.detach())


def _anonymous_file() -> int:
    """A descriptor of a fresh file in memory (``memfd``), or of an unlinked temporary
    file where the system has no ``memfd_create``."""
    create = getattr(os, "memfd_create", None)
    if create is not None:
        try:
            return int(create("destra-child", getattr(os, "MFD_CLOEXEC", 0)))
        except OSError:
            pass
    with tempfile.TemporaryFile() as f:
        return os.dup(f.fileno())


MAPPED_BYTES = 1 << 20
"""The ``bytes`` fields a dataclass job names in its ``mapped_fields`` travel, when this
large, beside its pickle and reach the child as writable memoryviews of a private
(copy-on-write) map of the job's file: no copy when it unpickles, and none when
``read_tensors`` makes tensors of them (two copies of the CNN example's 48 MiB input)."""


@dataclass(frozen=True)
class _Mapped:
    """Stands in the pickle for the job's ``index``-th mapped field."""

    index: int


def _write_job(fd: int, job: Any) -> None:
    """``u64 pickle length, u32 count, (u64 offset, u64 size) x count, pickle`` then each
    mapped field's bytes at a page-aligned offset (``MAPPED_BYTES``)."""
    mapped: list[bytes] = []
    if dataclasses.is_dataclass(job) and not isinstance(job, type):
        large = {}
        for name in getattr(job, "mapped_fields", ()):
            value = getattr(job, name)
            if isinstance(value, bytes) and len(value) >= MAPPED_BYTES:
                large[name] = _Mapped(len(mapped))
                mapped.append(value)
        job = dataclasses.replace(job, **large)
    pickled = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    at = 12 + 16 * len(mapped) + len(pickled)
    table = []
    for value in mapped:
        at += -at % mmap.PAGESIZE
        table.append((at, len(value)))
        at += len(value)
    with open(fd, "wb", closefd=False) as f:
        f.write(struct.pack("<QI", len(pickled), len(mapped)))
        for offset, size in table:
            f.write(struct.pack("<QQ", offset, size))
        f.write(pickled)
        for (offset, _), value in zip(table, mapped, strict=True):
            f.seek(offset)
            f.write(value)


def _read_job(fd: int) -> Any:
    """The job ``_write_job`` wrote, its mapped fields as writable views of a private map
    (kept open: tensors made from them refer to it until the child exits)."""
    size = os.fstat(fd).st_size
    whole = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
    n, count = struct.unpack_from("<QI", whole, 0)
    table = [struct.unpack_from("<QQ", whole, 12 + 16 * i) for i in range(count)]
    at = 12 + 16 * count
    job = pickle.loads(whole[at:at + n])  # noqa: S301 (the node pickled its own job, as multiprocessing does)
    if table:
        job = dataclasses.replace(job, **{
            field.name: whole[table[value.index][0]:sum(table[value.index])]
            for field in dataclasses.fields(job)
            if isinstance(value := getattr(job, field.name), _Mapped)})
    return job


def _write_parts(fd: int, parts: list[bytes]) -> None:
    os.ftruncate(fd, 0)
    with open(fd, "wb", closefd=False) as f:
        f.seek(0)
        for part in parts:
            f.write(part)


def _decode_reply(data: Any) -> Reply:
    """Parse what ``encode_reply`` wrote; ``program-failed`` for anything else."""
    try:
        (n,) = struct.unpack_from("<I", data, 0)
        head = json.loads(data[4:4 + n].decode("utf-8"))
        pos, blobs = 4 + n, {}
        for name, size in head["sizes"]:
            if not isinstance(name, str) or type(size) is not int or size < 0:
                raise ValueError("bad blob entry")
            blobs[name] = data[pos:pos + size]
            pos += size
        if pos != len(data) or not isinstance(head["facts"], dict):
            raise ValueError("length mismatch")
        return Reply(facts=head["facts"], blobs=blobs)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise WorkRefused("program-failed", f"the child's reply is malformed: {e}") from None


def _vm_bytes() -> int:
    """This process's current address-space size (``VmSize``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0  # not Linux: no measurement, the slack must do


def _limit_memory(device: str, memory_mb: int) -> None:
    budget = (MEMORY_FACTOR * memory_mb + MEMORY_SLACK_MB) * 2**20
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), dev)
        return
    limit = _vm_bytes() + budget
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _keep_freed_memory() -> None:
    """Let glibc reuse freed tensors' memory instead of unmapping it: a fresh child has
    not yet raised malloc's dynamic mmap threshold, so every tensor over 128 KiB would be
    a fresh ``mmap`` with a page fault per 4 KiB, each step (no-op off glibc)."""
    _libc_call("mallopt", -3, REUSED_BYTES)  # M_MMAP_THRESHOLD: glibc's maximum
    _libc_call("mallopt", -1, 512 * 2**20)  # M_TRIM_THRESHOLD


def _is_memory_error(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate" in text \
        or "cannot allocate" in text


def _limit_threads(threads: int) -> None:
    """The parent's torch thread count in the child: the forkserver started with torch's
    default (every core), not the node's ``--threads``."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _child_main(conn: Connection, fn: Callable[..., Reply], job_file: _Shared,
                reply_file: _Shared, device: str, memory_mb: int, threads: int = 0) -> None:
    """Entry point in the child: limit memory and threads, say "started", read the job,
    run, write the reply, say "replied", exit."""
    global in_child
    in_child = True
    try:
        _limit_memory(device, memory_mb)
        _limit_threads(threads)
        _keep_freed_memory()
        conn.send_bytes(b"started")
        reply = fn(_read_job(job_file.fd))
        parts = encode_reply(reply.facts, reply.blobs)
    except WorkRefused as e:
        parts = encode_reply({"refused": e.code, "detail": e.detail}, {})
    except BaseException as e:  # the program's failure, reported whatever it is
        code = "memory-limit" if _is_memory_error(e) else "program-failed"
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        parts = encode_reply({"refused": code, "detail": last[:500]}, {})
    try:
        _write_parts(reply_file.fd, parts)
        conn.send_bytes(b"replied")
    finally:
        conn.close()
        os._exit(0)  # skip atexit and finalizers of whatever the program loaded


def warm_up() -> None:
    """Start the forkserver (torch imported once) before the first task."""
    run_in_child(_nothing, None, device="cpu", memory_mb=1, bound_ms=60_000)


def _nothing(_job: Any) -> Reply:
    return Reply(facts={}, blobs={})


def run_in_child(fn: Callable[[Any], Reply], job: Any, *, device: str, memory_mb: int,
                 bound_ms: int, threads: int = 0, abandon: Future[Any] | None = None
                 ) -> Reply:
    """Run ``fn(job)`` in a fresh forkserver child under the limits above, on ``threads``
    torch threads (0: torch's default, every core).

    ``fn`` must be a module-level function of a module the child can import. Returns
    its ``Reply``; raises ``WorkRefused``: the child's own refusal, ``runtime-bound``
    when ``bound_ms`` passes, ``memory-limit``, or ``program-failed`` when it dies.
    ``abandon``: a check running beside the child (the payload's hashes); once it fails,
    the child is killed and the check's error raised, so a run that will not count
    stops within the check's time, not at the task's bound. A child that has not
    replied is killed at once, whatever stopped the wait.
    """
    ctx = _ctx()
    ours, theirs = ctx.Pipe(duplex=False)
    job_fd, reply_fd = _anonymous_file(), _anonymous_file()
    proc: Any = None
    replied = False
    try:
        _write_job(job_fd, job)
        proc = _Process(target=_child_main, args=(theirs, fn, _Shared(job_fd),
                                                  _Shared(reply_fd), device, memory_mb,
                                                  threads), daemon=True)
        proc.start()
        theirs.close()
        try:
            if not ours.poll(120) or ours.recv_bytes(16) != b"started":
                raise WorkRefused("program-failed", "the child did not start")
            deadline = time.monotonic() + bound_ms / 1000
            if not _answered(ours, deadline, abandon):
                raise WorkRefused(RUNTIME_BOUND, f"stopped after the {bound_ms} ms bound the "
                                  "task states (max_runtime_ms)")
            said = ours.recv_bytes(16)
        except (EOFError, OSError):
            proc.join(5)
            raise WorkRefused("program-failed", "the child died (exit code "
                              f"{proc.exitcode})") from None
        if said != b"replied":
            raise WorkRefused("program-failed", "the child's reply is malformed")
        replied = True
        reply = _read_reply(reply_fd)
    finally:
        theirs.close()
        ours.close()
        os.close(job_fd)
        os.close(reply_fd)
        if proc is not None:
            _reap(proc, kill=not replied)
    if "refused" in reply.facts:
        raise WorkRefused(str(reply.facts["refused"]), str(reply.facts.get("detail", "")))
    return reply


def _read_reply(fd: int) -> Reply:
    """The reply the child wrote to ``fd``; ``program-failed`` when it is too large or
    malformed."""
    size = os.fstat(fd).st_size
    if size > MAX_REPLY_BYTES:
        raise WorkRefused("program-failed", f"the child's reply is {size} bytes, over "
                          f"{MAX_REPLY_BYTES}")
    if size == 0:
        raise WorkRefused("program-failed", "the child's reply is malformed: empty")
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
        return _decode_reply(view)  # its blobs are copied out of the map


def _answered(ours: Any, deadline: float, abandon: Future[Any] | None) -> bool:
    """Whether the child spoke before ``deadline``; ``abandon``'s error once it fails.
    While ``abandon`` runs, the wait is cut in slices of ``ABANDON_POLL_S``."""
    while abandon is not None and not abandon.done():
        if ours.poll(max(0.0, min(ABANDON_POLL_S, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False
    if abandon is not None:
        abandon.result()  # raises the check's error: the run will not count
    return bool(ours.poll(max(0.0, deadline - time.monotonic())))


def _reap(proc: Any, kill: bool) -> None:
    """Kill the child now (``kill``: it has not replied, and what it computes will not
    be read) or, having replied, once it has not exited within 10 s; wait for it on a
    thread: a child that has replied is tearing down its address space (10 ms and more
    for large tensors), which the caller need not wait for."""
    def wait() -> None:
        if kill:
            proc.kill()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        if not proc.is_alive():
            proc.close()  # its sentinel descriptor

    threading.Thread(target=wait, name="reap-program-child", daemon=True).start()
