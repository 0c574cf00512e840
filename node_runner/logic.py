"""A node's task logic behind the processing contract: assignments in, commits and reveals out.

Pure: no Kafka, no threads, no clock. ``NodeRunner`` runs it on the real
broker (the computation on its thread pool), the in-memory runner runs it in
tests with a virtual clock. The computation itself is ``Work`` the logic asks
for: the runner calls ``compute`` and hands the result back to ``finished``.

* An assignment for this node, still before its commit deadline, takes a
  slot; a plain task starts at once, an encrypted one waits for the
  submitter's signed ``DataKeyGranted`` (checked against the submitter key in
  the assignment, refused when stale or replayed), whose key must open for
  one of the node's keys.
* A granted key that misses the submitter's commitment (``data_key_commitment`` in the
  assignment) is refused with a signed ``DataKeyRefused`` carrying the grant's
  key-encryption key: the verifier checks it and fails the task ``bad_data_key``,
  the submitter's fault, so the node is not judged for the result it cannot compute.
* When the work ends: a signed ``ResultCommitted`` (``H(salt, digest)`` bound
  to task, node and attempt).
* On ``RevealOpened``: the signed ``ResultRevealed`` (salt, digest, the output
  sealed to the submitter), or later, as soon as the result exists.
* A checkpointed workload (``workloads.checkpoints``) is run segment by segment
  (``run_recorded``: the same output, so the same digest, as ``run()``); the reveal also
  carries the leaf of every segment's end state (``ResultRevealed.checkpoints``). The
  leaves are signed with the reveal but NOT bound by the commitment: they are revealed
  only after every commit of the round is in, and a node reads only its own inbox, so it
  cannot see the other replicas' reveals (leaves included) before making its own. The
  node keeps each checkpoint's exact state bytes for its last ``KEEP_CHECKPOINTS`` tasks,
  each until ``CHECKPOINT_GRACE_MS`` past its reveal deadline (a node does not read
  verdicts: that is its stand-in for "the verdict plus a grace"), and answers a
  verifier's ``CheckpointRequested`` for one of them with a signed ``CheckpointProvided``.
* An assignment with ``segment >= 0`` makes the node a dispute's referee: it runs that
  one segment from ``pre_state`` (``run_segment``; the initial state for segment 0) and
  commits to and reveals the post-state's leaf as its digest.
* A workload that refuses the task (``workloads.base.WorkRefused``: a user program failing
  its checks, identically on every honest node) is not a crash: the node commits to the
  refusal's digest (``verifier.commitments.refusal_digest`` of its code) and reveals it with
  the code in the clear (``ResultRevealed.refusal``) and the detail sealed to the submitter,
  like a result. A quorum agreeing on it fails the task ``refused``, refunded.
* ``fault`` makes it misbehave for tests and the demo (``Fault``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from destra.confidential import open_grant
from destra.crypto import KeyPair, grant_key, sign_event, verify_event
from destra.errors import DecryptionFailed
from destra.freshness import Freshness
from schemas import Event, new_event
from schemas.bindings import data_key_commitment
from schemas.errors import InvalidParams
from streams.processing import Context, Outcome, Recovery, Work
from verifier.commitments import commitment, refusal_code, refusal_digest
from workloads.base import Workload, WorkRefused
from workloads.canonical import canonical_json, sha256
from workloads.checkpoints import (
    Checkpointed,
    checkpointed,
    initial_leaf,
    run_recorded,
    run_segment,
)
from workloads.lazy import torch

log = logging.getLogger(__name__)

LATE_BY_MS = 1_000
"""How long after its deadline a ``late`` node commits (or a ``late-reveal`` one reveals)."""
FORGET_AFTER_MS = 3_600_000
"""How long a node remembers a replica after committing or revealing it."""
COPY_WAIT_MS = 500
"""How long a copier waits for other replicas' reveals before revealing a copy."""
KEEP_CHECKPOINTS = 16
"""How many tasks' checkpoint states a node keeps for disputes (the most recent)."""
CHECKPOINT_GRACE_MS = 600_000
"""How long past its reveal deadline a task's checkpoint states are kept: a dispute asks
for them right after the reveals are in."""


class Fault(StrEnum):
    """Ways a node can misbehave on purpose."""

    NONE = "none"
    WRONG_RESULT = "wrong-result"
    NO_SHOW = "no-show"
    LATE = "late"
    """Commits after its commit deadline."""
    LATE_REVEAL = "late-reveal"
    """Commits in time, reveals after its reveal deadline."""
    COPY = "copy"
    BAD_CHECKPOINT = "bad-checkpoint"
    """Answers a dispute's checkpoint request with another state than the one asked for."""
    DIVERGE = "diverge"
    """Cuts corners on long training runs: on an mlp-digits task of at least
    ``DIVERGE_MIN_SEGMENTS`` segments, in a task's first round, it perturbs its state after
    the middle segment and carries on, so its checkpoints diverge there and its result is
    wrong; everything else it computes honestly (a node that earned trust, then turned)."""
    TAMPER_INPUT = "tamper-input"
    """Alters the task's input before running it: a user program's bytes (one byte flipped,
    which the program's own hash check refuses), else its seed or first private number
    (so its digest differs from the honest replicas' and it is outvoted)."""


DIVERGE_MIN_SEGMENTS = 4


@dataclass
class Computed:
    """What one replica's work produced."""

    output: bytes
    runtime_ms: int
    leaves: tuple[bytes, ...] = ()
    """A checkpointed workload's leaf per segment (revealed with the digest)."""
    states: tuple[bytes, ...] = ()
    """The exact state after each segment (``b""`` if too large to give), kept for a
    dispute's checkpoint request."""
    digest: bytes | None = None
    """A referee's digest: the post-state leaf of its segment, or a refusal's
    (``refusal_digest``); else ``sha256(output)``."""
    refusal: str | None = None
    """The workload refused the task with this code (``WorkRefused``); ``output`` is then
    the refusal document (code and detail) sealed to the submitter."""


def refused(err: WorkRefused, runtime_ms: int = 0) -> Computed:
    """What a replica reveals for a task its workload refused: the refusal's digest, its
    code in the clear, and a document with the detail for the submitter."""
    code = refusal_code(err.code)
    return Computed(canonical_json({"refused": code, "detail": err.detail}), runtime_ms,
                    digest=refusal_digest(code), refusal=code)


def tampered(workload: Workload, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` altered the way a ``tamper-input`` node alters them: one byte of a user
    program flipped, else the seed or the first private integer moved by one within its
    bounds (the public ones are seen by everyone, so a tamperer leaves them)."""
    out = dict(params)
    program = out.get("program")
    if isinstance(program, bytes | str) and program:
        try:
            raw = program if isinstance(program, bytes) else base64.b64decode(program)
        except (binascii.Error, ValueError):
            raw = b""
        if raw:
            flipped = bytearray(raw)
            flipped[len(flipped) // 2] ^= 0x01
            out["program"] = (bytes(flipped) if isinstance(program, bytes)
                              else base64.b64encode(bytes(flipped)).decode("ascii"))
            return out
    specs = sorted((s for s in workload.params if not s.public and s.kind == "int"),
                   key=lambda s: s.name != "seed")
    for spec in specs:
        value = out.get(spec.name)
        if isinstance(value, int):
            up = spec.max is None or value + 1 <= spec.max
            out[spec.name] = value + 1 if up else value - 1
            return out
    return out


def run_assignment(assignment: Event, workload: Workload, params: dict[str, Any],
                   device: torch.device, fault: Fault = Fault.NONE) -> Computed:
    """One replica's work on validated ``params``: the whole task (a checkpointed
    workload segment by segment, keeping leaves and states), or, for a referee
    (``segment >= 0``), that one segment from ``pre_state``. ``InvalidParams`` for a
    referee assignment the workload or its pre-state cannot serve. A ``WorkRefused`` from
    the workload is a result too (``refused``)."""
    if fault == Fault.TAMPER_INPUT:
        params = tampered(workload, params)
    started = time.perf_counter_ns()
    try:
        return _run_assignment(assignment, workload, params, device, fault)
    except WorkRefused as err:
        return refused(err, (time.perf_counter_ns() - started) // 1_000_000)


def _run_assignment(assignment: Event, workload: Workload, params: dict[str, Any],
                    device: torch.device, fault: Fault) -> Computed:
    f = assignment.fields
    segment = f.get("segment", -1)
    if segment is not None and segment >= 0:
        ckpt = checkpointed(workload)
        pre = f.get("pre_state")
        started = time.perf_counter_ns()
        if pre is None:
            if segment != 0:
                raise InvalidParams(f"segment {segment} needs its pre-state")
            pre = initial_leaf(ckpt, params, device)[1]
        _, post, _ = run_segment(ckpt, params, segment, pre, device)
        return Computed(b"", (time.perf_counter_ns() - started) // 1_000_000, digest=post)
    if isinstance(workload, Checkpointed):
        tamper = None
        segments = workload.segments(params)
        if (fault == Fault.DIVERGE and workload.name == "mlp-digits" and f.get("round", 0) == 0
                and segments >= DIVERGE_MIN_SEGMENTS):
            tamper = segments // 2
        leaves, states, result = run_recorded(workload, params, device, tamper)
        return Computed(result.output, result.runtime_ms, tuple(leaves), tuple(states))
    result = workload.run(params, device)
    return Computed(result.output, result.runtime_ms)


@dataclass
class _Result:
    attempt: int
    salt: bytes
    digest: bytes
    runtime_ms: int
    at_ms: int
    """When it was committed."""
    sealed: bytes | None = None
    """The output sealed to the submitter, when carried inline."""
    sealed_ref: str | None = None
    """Its blob reference, when too big to travel in the reveal."""
    commit_deadline: int | None = None
    reveal_deadline: int | None = None
    """The assignment's deadlines: a result committed after the first is never called to
    reveal, and a reveal after the second is refused (``pending``)."""
    leaves: tuple[bytes, ...] = ()
    """Checkpoint leaves, revealed with the digest."""
    refusal: str | None = None
    """The refusal code revealed with the digest, when the workload refused the task."""

    def callable_at(self, now_ms: int) -> bool:
        """Whether a reveal call for it may still come and be worth answering."""
        if self.commit_deadline is not None and self.at_ms > self.commit_deadline:
            return False  # committed late: refused, no reveal phase opens for it
        return self.reveal_deadline is None or now_ms <= self.reveal_deadline


Compute = Callable[[Event, bytes | None], Computed]
"""(assignment, data key or None) -> the canonical output and its runtime."""
Seal = Callable[[Event, bytes], tuple[bytes | None, str | None]]
"""(assignment, output) -> the output sealed to the submitter, inline or as a blob ref."""
CopyDigest = Callable[[str], bytes | None]
"""The copier's trick: another replica's revealed digest for a task."""


@dataclass
class NodeLogic:
    """One node's replicas, from assignment to reveal."""

    node_id: str
    keyring: tuple[KeyPair, ...]
    """The node's keys, current first (older ones still open grants made before a rotation)."""
    compute: Compute
    seal: Seal
    slots: int = 1
    fault: Fault = Fault.NONE
    producer_id: str = "node"
    copy_digest: CopyDigest = lambda task_id: None
    accept_work: bool = True
    """False while draining: no new replica starts."""
    awaiting: dict[tuple[str, int], Event] = field(default_factory=dict)
    """Encrypted assignments waiting for their data key."""
    results: dict[tuple[str, int], _Result] = field(default_factory=dict)
    reveal_calls: dict[tuple[str, int], Event] = field(default_factory=dict)
    """Reveal calls for results not finished yet (a late node's)."""
    revealed: dict[tuple[str, int], int] = field(default_factory=dict)
    """Replicas revealed, and when: a repeated reveal call (a restart re-reading its
    partition) is answered once. Results go once revealed, so memory stays bounded."""
    freshness: Freshness = field(default_factory=Freshness)
    busy: int = 0
    completed: int = 0
    checkpoints: dict[tuple[str, int], tuple[tuple[bytes, ...], int]] = field(
        default_factory=dict)
    """Per (task, attempt), oldest first: the exact state after each segment and when to
    forget them (``KEEP_CHECKPOINTS``, ``CHECKPOINT_GRACE_MS``)."""

    name = "node"
    inputs = frozenset({"TaskAssigned", "DataKeyGranted", "RevealOpened",
                        "CheckpointRequested"})
    recovery = Recovery.NONE
    """A killed node's running and committed replicas are lost: the verifier reissues
    what was not committed and judges a missing reveal."""

    def __post_init__(self) -> None:
        self.name = f"node:{self.node_id}"

    @property
    def keys(self) -> KeyPair:
        """The node's current keys."""
        return self.keyring[0]

    def handle(self, event: Event, ctx: Context) -> Outcome:
        """An event about one of this node's replicas (others are ignored)."""
        if event.fields.get("node_id") != self.node_id:
            return Outcome()
        if event.name == "TaskAssigned":
            return self._on_assigned(event, ctx)
        if event.name == "DataKeyGranted":
            return self._on_grant(event, ctx) if self.accept_work else Outcome()
        if event.name == "RevealOpened":
            if self.fault in (Fault.LATE_REVEAL, Fault.COPY):
                # The copier waits for others' reveals to copy from.
                later = (event.fields["reveal_deadline"] + LATE_BY_MS
                         if self.fault == Fault.LATE_REVEAL else ctx.now_ms + COPY_WAIT_MS)
                return Outcome(work=[Work(("reveal", event), lambda: None, later)])
            return self._reveal(event, ctx)
        if event.name == "CheckpointRequested":
            return self._give_checkpoint(event, ctx)
        return Outcome()

    def _give_checkpoint(self, request: Event, ctx: Context) -> Outcome:
        """A dispute's request for one checkpoint's exact state: given if still kept."""
        f = request.fields
        kept = self.checkpoints.get((f["task_id"], f["attempt"]))
        index = f["checkpoint"]
        if kept is None or not 0 <= index < len(kept[0]) or not kept[0][index]:
            return Outcome()
        state = kept[0][index]
        if self.fault == Fault.BAD_CHECKPOINT:
            state = kept[0][(index + 1) % len(kept[0])] if len(kept[0]) > 1 else state + b" "
        return Outcome.of([self._signed(new_event(
            "CheckpointProvided", self.producer_id, occurred_at=ctx.now_ms,
            task_id=f["task_id"], node_id=self.node_id, attempt=f["attempt"],
            checkpoint=index, state=state))])

    def tick(self, ctx: Context) -> Outcome:
        """Give up the replicas whose grant did not come by their commit deadline."""
        for key, a in list(self.awaiting.items()):
            if a.fields["commit_deadline"] < ctx.now_ms or not self.accept_work:
                del self.awaiting[key]
                self.busy -= 1
        self.freshness.prune(ctx.now_ms)
        # Forget what no verifier can still ask about: any reveal deadline is long past.
        old = ctx.now_ms - FORGET_AFTER_MS
        for done in [k for k, at in self.revealed.items() if at < old]:
            del self.revealed[done]
        for stale in [k for k, r in self.results.items() if r.at_ms < old]:
            del self.results[stale]
        for stale in [k for k, c in self.reveal_calls.items()
                      if c.fields["reveal_deadline"] < old]:
            del self.reveal_calls[stale]
        for stale in [k for k, (_, until) in self.checkpoints.items() if until < ctx.now_ms]:
            del self.checkpoints[stale]
        return Outcome()

    def pending(self, now_ms: int | None = None) -> bool:
        """Whether a replica is running or a result has not been revealed; at ``now_ms``,
        only a result whose reveal call may still come counts (a draining node waits for
        those, not for calls that never come)."""
        if self.busy > 0:
            return True
        if now_ms is None:
            return bool(self.results)
        return any(r.callable_at(now_ms) for r in self.results.values())

    def _on_assigned(self, a: Event, ctx: Context) -> Outcome:
        f = a.fields
        if not self.accept_work or f["commit_deadline"] < ctx.now_ms:
            return Outcome()  # draining, or stale work a restart re-read: it was replaced
        if self.fault == Fault.NO_SHOW:
            return Outcome()
        self.busy += 1
        if f["payload"] is None and f["payload_ref"] is None:
            return self._work(a, None)
        self.awaiting[(f["task_id"], f["attempt"])] = a
        return Outcome()

    def _on_grant(self, grant: Event, ctx: Context) -> Outcome:
        f = grant.fields
        assignment = self.awaiting.get((f["task_id"], f["attempt"]))
        if assignment is None:
            return Outcome()  # not ours to run (stale, replaced or already started)
        a = assignment.fields
        if not verify_event(grant, a["submitter_key"], a["submitter_id"]):
            return Outcome.refuse(grant, f"bad-signature: grant for {f['task_id']} not signed "
                                         f"by its submitter {a['submitter_id']}", ctx.origin)
        refusal = self.freshness.refusal(grant, ctx.now_ms)
        if refusal is not None:
            return Outcome.refuse(grant, refusal, ctx.origin)
        data_key = None
        problem: Exception | None = None
        for keys in self.keyring:
            try:
                data_key = open_grant(keys, grant)
                break
            except DecryptionFailed as err:
                problem = err
        if data_key is None:
            return Outcome.refuse(grant, f"undecryptable-grant: {problem}", ctx.origin)
        self.freshness.accept(grant)
        committed = a["data_key_commitment"]
        if committed and data_key_commitment(f["task_id"], data_key) != committed:
            # The submitter's fault, shown to the verifier: the grant's key-encryption key
            # opens that grant only. The replica is given up; no result is owed.
            del self.awaiting[(f["task_id"], f["attempt"])]
            self.busy -= 1
            proof = self._signed(new_event(
                "DataKeyRefused", self.producer_id, occurred_at=ctx.now_ms,
                task_id=f["task_id"], node_id=self.node_id, attempt=f["attempt"],
                grant_id=grant.event_id,
                grant_key=grant_key(keys, f["ephemeral_public_key"])))
            out = Outcome.of([proof])
            out += Outcome.refuse(grant, f"bad-data-key: the key granted for {f['task_id']} "
                                         "does not match the submitter's commitment",
                                  ctx.origin)
            return out
        del self.awaiting[(f["task_id"], f["attempt"])]
        return self._work(assignment, data_key)

    def _work(self, a: Event, data_key: bytes | None) -> Outcome:
        f = a.fields
        key = (f["task_id"], f["attempt"], a)
        if self.fault == Fault.COPY:  # computes nothing
            return Outcome(work=[Work(key, lambda: Computed(b"", 0))])
        not_before = f["commit_deadline"] + LATE_BY_MS if self.fault == Fault.LATE else None
        return Outcome(work=[Work(key, lambda: self.compute(a, data_key), not_before)])

    def finished(self, key: Any, result: Any, ctx: Context) -> Outcome:
        """The work for one replica ended: commit to its result."""
        if key[0] == "reveal":  # a late revealer's delayed answer
            return self._reveal(key[1], ctx)
        task_id, attempt, assignment = key
        self.busy -= 1
        self.completed += 1
        if isinstance(result, WorkRefused):  # raised by a compute of its own
            result = refused(result)
        if isinstance(result, BaseException):
            # The verifier times the replica out; the node goes on.
            log.error("task %s failed on %s: %r", task_id, self.node_id, result,
                      extra={"task_id": task_id})
            return Outcome()
        salt = ctx.rng.randbytes(32)
        refusal = getattr(result, "refusal", None)
        if self.fault == Fault.COPY:
            digest, sealed, sealed_ref, refusal = ctx.rng.randbytes(32), None, None, None
        else:
            digest = result.digest if result.digest is not None else sha256(result.output)
            if self.fault == Fault.WRONG_RESULT:
                digest = hashlib.sha256(b"not the output" + digest).digest()
                refusal = None
            referee = assignment.fields.get("segment", -1) >= 0  # its leaf is no result
            sealed, sealed_ref = (self.seal(assignment, result.output)
                                  if assignment.fields["result_key"] and not referee
                                  else (None, None))
        leaves = tuple(getattr(result, "leaves", ()))
        self.results[(task_id, attempt)] = _Result(
            attempt, salt, digest, result.runtime_ms, ctx.now_ms, sealed, sealed_ref,
            assignment.fields["commit_deadline"], assignment.fields["reveal_deadline"],
            leaves, refusal)
        states = tuple(getattr(result, "states", ()))
        if states:
            self.checkpoints.pop((task_id, attempt), None)
            self.checkpoints[(task_id, attempt)] = (
                states, assignment.fields["reveal_deadline"] + CHECKPOINT_GRACE_MS)
            while len(self.checkpoints) > KEEP_CHECKPOINTS:
                del self.checkpoints[next(iter(self.checkpoints))]
        out = Outcome.of([self._signed(new_event(
            "ResultCommitted", self.producer_id, occurred_at=ctx.now_ms, task_id=task_id,
            node_id=self.node_id, attempt=attempt,
            commitment=commitment(task_id, self.node_id, attempt, salt, digest)))])
        early = self.reveal_calls.pop((task_id, attempt), None)
        if early is not None:
            out += self._reveal(early, ctx)
        return out

    def _reveal(self, call: Event, ctx: Context) -> Outcome:
        f = call.fields
        key = (f["task_id"], f["attempt"])
        if key in self.revealed:
            return Outcome()
        result = self.results.pop(key, None)
        if result is None:
            self.reveal_calls[key] = call
            return Outcome()
        self.revealed[key] = ctx.now_ms
        digest = result.digest
        if self.fault == Fault.COPY:
            digest = self.copy_digest(f["task_id"]) or digest
        if result.refusal is not None:
            log.info("refusing task %s on %s: %s", f["task_id"], self.node_id, result.refusal,
                     extra={"task_id": f["task_id"]})
        return Outcome.of([self._signed(new_event(
            "ResultRevealed", self.producer_id, occurred_at=ctx.now_ms, task_id=f["task_id"],
            node_id=self.node_id,
            attempt=f["attempt"], salt=result.salt, digest=digest,
            runtime_ms=result.runtime_ms, result_ref=result.sealed_ref, result=result.sealed,
            checkpoints=list(result.leaves), refusal=result.refusal))])

    def heartbeat_load(self) -> tuple[int, int]:
        """(load in permille, free slots) for the next heartbeat."""
        return (min(1000, self.busy * 1000 // self.slots), max(0, self.slots - self.busy))

    def _signed(self, event: Event) -> Event:
        return sign_event(event, self.keys, self.node_id)
