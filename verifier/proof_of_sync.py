"""Proof of Sync: one task's commit-reveal tally, from assignments to a quorum verdict.

Pure and deterministic: no I/O, no clock. Time moves only through ``now_ms``
arguments and never goes back (an earlier ``now_ms`` counts as the latest seen).
The adapter checks each event's signature against the node's registered key
before calling in, and passes as ``now_ms`` a time the node cannot forge (the
broker's log-append timestamp, which replays identically) and, to ``on_tick``, a
watermark: no event stamped earlier is still to come. Same calls, same
decisions, so replaying the topics rebuilds the same tally.

Rules:

* Commit phase. Each replica's node commits by its ``commit_deadline``
  (inclusive). A replica still uncommitted after it: ``Penalize(no_show)`` and,
  while reissues remain (``max_attempts`` over the whole task, lowest replica
  first) and the quorum is still reachable, ``Reissue`` with ``attempt + 1``
  excluding every node ever used for the task. Else the replica is dropped.
* Reveal phase opens when every replica has committed or been dropped; a
  replica waiting for its reissue keeps the phase closed (for at most
  ``reissue_grace_ms``, then it is dropped), so every counted commitment was
  made before any digest could be public: a copier has nothing to copy. A
  voter's reveal deadline is its own, pushed back when the phase opened late
  so that it keeps its ``reveal_deadline - commit_deadline`` window.
* A reveal counts only if it opens that node's own commitment. A voter with
  no valid reveal by its deadline: ``Penalize(no_reveal)``, never reissued,
  since a node committing now could copy the digests already revealed.
* Verdict once no voter is pending and ``quorum`` reveals agree: ``Verified``
  paying ``compute_units`` to each agreeing replica, 0 to dissenters, then
  ``Penalize(dissent)`` for each dissenter. When the agreed digest is a refusal
  (``verifier.commitments.refusal_digest``, proven by an agreeing reveal's
  ``refusal`` code): ``Failed(refused)`` instead, nobody paid, the task refunded,
  and still ``Penalize(dissent)`` for each dissenter (a node that computed what a
  quorum refused, or refused what a quorum computed, is judged the same), with one
  exception. A task with a wall-clock bound (``runtime_bound_ms``: a user program's) may
  be finished by a fast node and stopped at the bound on a slow one, both honest: a
  ``runtime-bound`` refusal and a result do not contradict each other. So a replica
  that revealed ``runtime-bound`` at least the bound after it was assigned (it could
  have run that long) is not judged when a result is verified (nor paid), and a
  replica that revealed a result is not judged when a quorum was stopped at the bound.
  A ``runtime-bound`` committed sooner is a claim no honest node makes: dissent. A
  reveal whose ``refusal`` does not hash to its digest is rejected
  (``refusal_mismatch``). As soon as no digest can reach the
  quorum: ``Failed(no_quorum)``, no one judged a dissenter. Past
  ``expires_at``: ``Failed(deadline_passed)``.
* ``Rejected`` answers an event that must be ignored (dead-letter material);
  it changes nothing. An accepted event applied again yields no decisions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from destra.errors import InvalidQuorum
from verifier.commitments import matches, matches_refusal
from workloads.base import RUNTIME_BOUND

MAX_REPLICAS = 15  # TaskSubmitted.replicas


class Reason(StrEnum):
    """Why a node is penalized or a task failed (``NodePenalized`` / ``TaskFailed.reason``)."""

    NO_SHOW = "no_show"
    NO_REVEAL = "no_reveal"
    DISSENT = "dissent"
    NO_QUORUM = "no_quorum"
    DEADLINE_PASSED = "deadline_passed"
    NO_DATA_KEY = "no_data_key"
    BAD_DATA_KEY = "bad_data_key"
    """A node proved its grant's key misses the submitter's commitment (``DataKeyRefused``)."""
    REFUSED = "refused"
    """A quorum agreed on a refusal (``ResultRevealed.refusal``): the task itself cannot be
    run (a user program failing its checks on every node); refunded, nobody penalized
    but dissenters."""


class RejectReason(StrEnum):
    """Why an assignment, commit or reveal is ignored."""

    TASK_CLOSED = "task_closed"
    BAD_REPLICA = "bad_replica"
    BAD_DEADLINES = "bad_deadlines"
    NODE_REUSED = "node_reused"
    UNEXPECTED_ASSIGNMENT = "unexpected_assignment"
    NOT_ASSIGNED = "not_assigned"
    WRONG_ATTEMPT = "wrong_attempt"
    LATE_COMMIT = "late_commit"
    CONFLICTING_COMMIT = "conflicting_commit"
    MALFORMED = "malformed"
    REVEAL_WITHOUT_COMMITMENT = "reveal_without_commitment"
    REVEAL_TOO_EARLY = "reveal_too_early"
    LATE_REVEAL = "late_reveal"
    REVEAL_MISMATCH = "reveal_mismatch"
    CONFLICTING_REVEAL = "conflicting_reveal"
    REFUSAL_MISMATCH = "refusal_mismatch"


@dataclass(frozen=True)
class Contribution:
    """One revealed replica in a verdict (``TaskVerified.contributions``)."""

    node_id: str
    compute_units: int
    """Compute the node is paid for: the task's units if it agreed, else 0."""
    agreed: bool


@dataclass(frozen=True)
class Verified:
    """The task's digest is accepted (``TaskVerified``)."""

    task_id: str
    digest: bytes
    quorum: int
    contributions: tuple[Contribution, ...]
    result_ref: str | None
    """The lowest-indexed agreeing replica's result ciphertext reference."""


@dataclass(frozen=True)
class Reissue:
    """Place this replica again, on a node not in ``exclude_node_ids``."""

    task_id: str
    replica_index: int
    attempt: int
    exclude_node_ids: tuple[str, ...]


@dataclass(frozen=True)
class Penalize:
    """Judge a node for a fault on this task (``NodePenalized``; the amount is policy's)."""

    node_id: str
    task_id: str
    reason: Reason


@dataclass(frozen=True)
class Failed:
    """The task cannot be verified (``TaskFailed``); its escrow is refunded."""

    task_id: str
    reason: Reason
    detail: str
    digest: bytes = b""
    """For ``refused``: the refusal digest the quorum agreed on (an earlier round's
    replicas that revealed another are dissenters)."""


@dataclass(frozen=True)
class Disputed:
    """The replicas disagree and the tally escalates instead of judging (``escalate``):
    nobody is paid or penalized yet; a later round decides whose digest was right."""

    task_id: str
    revealed: tuple[tuple[str, bytes, str | None], ...]
    """(node, digest, result reference) of every replica that revealed."""
    checkpoints: tuple[tuple[bytes, ...], ...] = ()
    """Each revealed replica's checkpoint leaves (``ResultRevealed.checkpoints``), in the
    order of ``revealed``: what a dispute by bisection walks."""
    attempts: tuple[int, ...] = ()
    """Each revealed replica's attempt, in the order of ``revealed``."""


@dataclass(frozen=True)
class RevealOpened:
    """The commit phase closed at ``opened_at_ms``: voters may reveal now."""

    task_id: str
    opened_at_ms: int


@dataclass(frozen=True)
class Rejected:
    """The event must be ignored (dead-lettered with ``reason``); no state changed."""

    task_id: str
    node_id: str
    reason: RejectReason
    detail: str


Decision = Verified | Reissue | Penalize | Failed | RevealOpened | Rejected | Disputed


class Status(StrEnum):
    """Where one replica slot stands."""

    UNASSIGNED = "unassigned"  # waiting for its first TaskAssigned
    AWAITING = "awaiting"  # reissued, waiting for the new TaskAssigned
    ASSIGNED = "assigned"
    COMMITTED = "committed"
    REVEALED = "revealed"
    DROPPED = "dropped"  # out of the tally for good


@dataclass
class _Slot:
    index: int
    status: Status = Status.UNASSIGNED
    attempt: int = 0
    node_id: str | None = None
    commit_deadline: int = 0
    reveal_deadline: int = 0
    awaiting_since: int = 0
    commitment: bytes | None = None
    salt: bytes = b""
    digest: bytes = b""
    result_ref: str | None = None
    leaves: tuple[bytes, ...] = ()
    """The checkpoint leaves revealed with the digest (signed, not committed to)."""
    refusal: str | None = None
    """The refusal code revealed with the digest (it hashes to the digest), if any."""
    assigned_at: int = 0
    """The tally's clock when this attempt was assigned."""
    committed_at: int = 0
    """The tally's clock when it committed."""


class TaskTally:
    """The Proof of Sync state of one task; feed it events, act on the decisions.

    With ``escalate`` (adaptive trust, ``allocator.trust``), any disagreement among the
    revealed digests ends the tally ``Disputed`` instead of a majority verdict: a
    quorum of colluders cannot outvote an honest replica without a further round.
    """

    escalate = False
    """Class default: tallies pickled before rounds existed never escalate."""
    runtime_bound_ms = 0
    """The task's wall-clock bound (0: none; class default for older snapshots)."""

    def __init__(self, task_id: str, compute_units: int, replicas: int = 3, quorum: int = 2,
                 *, max_attempts: int = 3, reissue_grace_ms: int = 60_000,
                 expires_at: int | None = None, escalate: bool = False,
                 runtime_bound_ms: int = 0) -> None:
        if not 1 <= replicas <= MAX_REPLICAS:
            raise InvalidQuorum(f"task {task_id}: replicas {replicas} out of 1..{MAX_REPLICAS}")
        if not replicas >= quorum > replicas / 2:
            raise InvalidQuorum(f"task {task_id}: quorum {quorum} of {replicas} replicas "
                                f"must be a majority, at most {replicas}")
        if compute_units < 1 or max_attempts < 0 or reissue_grace_ms < 0:
            raise ValueError("compute_units >= 1, max_attempts >= 0, reissue_grace_ms >= 0")
        self.task_id, self.compute_units = task_id, compute_units
        self.replicas, self.quorum = replicas, quorum
        self.max_attempts, self.reissue_grace_ms = max_attempts, reissue_grace_ms
        self.expires_at = expires_at
        self.escalate = escalate
        self.runtime_bound_ms = runtime_bound_ms
        self.reissues = 0
        self.opened_at: int | None = None
        self.outcome: Verified | Failed | Disputed | None = None
        self._slots = [_Slot(i) for i in range(replicas)]
        self._used: dict[str, tuple[int, int]] = {}  # node ever assigned -> (replica, attempt)
        self._clock = 0
        self.send_floor_ms = 0
        """The time decisions are sent at (processing time), when the caller knows it is
        later than the events' time: the reveal phase opens no earlier."""

    # -- events ---------------------------------------------------------------------------

    def on_assigned(self, node_id: str, replica_index: int, attempt: int,
                    commit_deadline: int, reveal_deadline: int,
                    now_ms: int | None = None) -> list[Decision]:
        """A ``TaskAssigned``: attempt 0 of a replica, or the attempt a ``Reissue`` asked for.

        With ``now_ms``, time advances first, as in the other handlers.
        """
        out = [] if now_ms is None else self.on_tick(now_ms)
        return out + self._assign(node_id, replica_index, attempt, commit_deadline,
                                  reveal_deadline)

    def _assign(self, node_id: str, replica_index: int, attempt: int,
                commit_deadline: int, reveal_deadline: int) -> list[Decision]:
        if not 0 <= replica_index < self.replicas:
            return self._reject(node_id, RejectReason.BAD_REPLICA, f"replica {replica_index}")
        slot = self._slots[replica_index]
        if self._used.get(node_id) == (replica_index, attempt):
            return []  # redelivered, maybe after the attempt was replaced
        if self.outcome is not None:
            return self._reject(node_id, RejectReason.TASK_CLOSED, "")
        if node_id in self._used:
            return self._reject(node_id, RejectReason.NODE_REUSED,
                                f"already ran replica {self._used[node_id][0]}")
        if slot.status not in (Status.UNASSIGNED, Status.AWAITING) or attempt != slot.attempt:
            return self._reject(node_id, RejectReason.UNEXPECTED_ASSIGNMENT,
                                f"replica {replica_index} is {slot.status} at attempt "
                                f"{slot.attempt}, not open for attempt {attempt}")
        if reveal_deadline < commit_deadline:
            return self._reject(node_id, RejectReason.BAD_DEADLINES, "reveal before commit")
        slot.status, slot.node_id = Status.ASSIGNED, node_id
        slot.commit_deadline, slot.reveal_deadline = commit_deadline, reveal_deadline
        slot.assigned_at = self._clock
        self._used[node_id] = (replica_index, attempt)
        return []

    def on_committed(self, node_id: str, attempt: int, commitment: bytes,
                     now_ms: int) -> list[Decision]:
        """A ``ResultCommitted`` whose signature the adapter has checked."""
        out = self.on_tick(now_ms)
        slot = self._slot_of(node_id, attempt)
        if isinstance(slot, RejectReason):
            # A node is only ever replaced for missing its commit deadline.
            late = slot == RejectReason.NOT_ASSIGNED and node_id in self._used
            return out + self._reject(node_id, RejectReason.LATE_COMMIT if late else slot, "")
        if slot.commitment is not None:
            if slot.commitment == commitment:
                return out
            return out + self._reject(node_id, RejectReason.CONFLICTING_COMMIT, "")
        if self.outcome is not None:
            return out + self._reject(node_id, RejectReason.TASK_CLOSED, "")
        if slot.status != Status.ASSIGNED or self._clock > slot.commit_deadline:
            return out + self._reject(node_id, RejectReason.LATE_COMMIT,
                                      f"deadline was {slot.commit_deadline}")
        if len(commitment) != 32:
            return out + self._reject(node_id, RejectReason.MALFORMED, "commitment not 32 bytes")
        slot.status, slot.commitment = Status.COMMITTED, bytes(commitment)
        slot.committed_at = self._clock
        return out + self._maybe_open()

    def on_revealed(self, node_id: str, attempt: int, salt: bytes, digest: bytes,
                    runtime_ms: int, now_ms: int,
                    result_ref: str | None = None,
                    checkpoints: Sequence[bytes] = (),
                    refusal: str | None = None) -> list[Decision]:
        """A ``ResultRevealed`` whose signature the adapter has checked; its
        ``checkpoints`` are kept for a dispute (``Disputed.checkpoints``); a ``refusal``
        must hash to its digest (``verifier.commitments.refusal_digest``)."""
        out = self.on_tick(now_ms)
        slot = self._slot_of(node_id, attempt)
        if isinstance(slot, RejectReason):
            if slot == RejectReason.NOT_ASSIGNED and node_id in self._used:
                slot = RejectReason.REVEAL_WITHOUT_COMMITMENT  # replaced before committing
            return out + self._reject(node_id, slot, "")
        if slot.status == Status.REVEALED:
            if (slot.salt, slot.digest) == (salt, digest):
                return out
            return out + self._reject(node_id, RejectReason.CONFLICTING_REVEAL, "")
        if slot.commitment is None:
            return out + self._reject(node_id, RejectReason.REVEAL_WITHOUT_COMMITMENT, "")
        if slot.status == Status.DROPPED:
            return out + self._reject(node_id, RejectReason.LATE_REVEAL, "")
        if self.outcome is not None:
            return out + self._reject(node_id, RejectReason.TASK_CLOSED, "")
        if self.opened_at is None:
            return out + self._reject(node_id, RejectReason.REVEAL_TOO_EARLY,
                                      "commit phase still open")
        if len(digest) != 32 or not 16 <= len(salt) <= 64 or runtime_ms < 0:
            return out + self._reject(node_id, RejectReason.MALFORMED, "digest, salt or runtime")
        if not matches_refusal(refusal, digest):
            return out + self._reject(node_id, RejectReason.REFUSAL_MISMATCH,
                                      f"refusal {refusal!r} does not hash to the digest")
        if not matches(slot.commitment, self.task_id, node_id, attempt, salt, digest):
            return out + self._reject(node_id, RejectReason.REVEAL_MISMATCH,
                                      "does not open the commitment")
        slot.status, slot.salt, slot.digest = Status.REVEALED, bytes(salt), bytes(digest)
        slot.result_ref = result_ref
        slot.leaves = tuple(bytes(leaf) for leaf in checkpoints)
        slot.refusal = refusal
        return out + self._judge()

    @property
    def clock(self) -> int:
        """The latest time this tally has seen."""
        return self._clock

    def on_tick(self, now_ms: int) -> list[Decision]:
        """Time has reached ``now_ms``: judge missed deadlines, maybe decide the task."""
        self._clock = now = max(self._clock, now_ms)
        if self.outcome is not None:
            return []
        out: list[Decision] = []
        if self.opened_at is None:
            missed = []
            for slot in self._slots:
                if slot.status == Status.ASSIGNED and now > slot.commit_deadline:
                    out.append(Penalize(self._node(slot), self.task_id, Reason.NO_SHOW))
                    slot.status, slot.node_id = Status.DROPPED, None
                    missed.append(slot)
                elif (slot.status == Status.AWAITING
                      and now > slot.awaiting_since + self.reissue_grace_ms):
                    slot.status = Status.DROPPED  # the allocator never placed it
            out += self._reissue(missed)
            out += self._maybe_open()
        else:
            for slot in self._slots:
                if slot.status == Status.COMMITTED and now > self._reveal_deadline(slot):
                    out.append(Penalize(self._node(slot), self.task_id, Reason.NO_REVEAL))
                    slot.status = Status.DROPPED
            out += self._judge()
        if self.outcome is None and self.expires_at is not None and now > self.expires_at:
            out += self._fail(Reason.DEADLINE_PASSED, f"not verified by {self.expires_at}")
        return out

    # -- rules ----------------------------------------------------------------------------

    def _reissue(self, missed: list[_Slot]) -> list[Decision]:
        """Reissue dropped replicas, lowest index first, while reissues remain.

        None at all if even every reissue could not bring the quorum back in
        reach: the task is about to fail, and placing work for it would waste it.
        """
        live = sum(s.status != Status.DROPPED for s in self._slots)
        count = min(len(missed), self.max_attempts - self.reissues)
        if live + count < self.quorum:
            return []
        out: list[Decision] = []
        for slot in missed[:count]:
            self.reissues += 1
            slot.status, slot.attempt = Status.AWAITING, slot.attempt + 1
            slot.awaiting_since = self._clock
            out.append(Reissue(self.task_id, slot.index, slot.attempt, self.nodes_used))
        return out

    def _maybe_open(self) -> list[Decision]:
        """Open the reveal phase once no replica can still commit; fail if too few did."""
        if self.outcome is not None:
            return []
        committed = sum(s.status == Status.COMMITTED for s in self._slots)
        live = sum(s.status != Status.DROPPED for s in self._slots)
        if live < self.quorum:
            return self._fail(Reason.NO_QUORUM, f"{live} replicas left, quorum {self.quorum}")
        if self.opened_at is not None or committed < live:
            return []
        # The calls to reveal go out now, at processing time, which a worker catching up
        # on a backlog is past the commits' time: every voter's window counts from there.
        self.opened_at = max(self._clock, self.send_floor_ms)
        return [RevealOpened(self.task_id, self.opened_at)]

    def _judge(self) -> list[Decision]:
        """Verdict when no voter is pending and a digest has quorum; fail when none can."""
        if self.outcome is not None:
            return []
        revealed = [s for s in self._slots if s.status == Status.REVEALED]
        pending = sum(s.status == Status.COMMITTED for s in self._slots)
        counts = Counter(s.digest for s in revealed)
        digest, count = counts.most_common(1)[0] if counts else (b"", 0)
        if self.escalate and len(counts) > 1 and (not pending or count + pending < self.quorum):
            self.outcome = Disputed(self.task_id, tuple((self._node(s), s.digest, s.result_ref)
                                                        for s in revealed),
                                    tuple(s.leaves for s in revealed),
                                    tuple(s.attempt for s in revealed))
            return [self.outcome]
        if count + pending < self.quorum:
            return self._fail(Reason.NO_QUORUM, f"best digest has {count} of {self.quorum} "
                                                f"with {pending} reveals pending")
        if pending or count < self.quorum:
            return []
        # The quorum is a majority, so the digest with `count >= quorum` is unique.
        contributions = tuple(
            Contribution(self._node(s), self.compute_units if s.digest == digest else 0,
                         s.digest == digest) for s in revealed)
        # An agreeing reveal's code proves the digest a refusal (no output hashes to it).
        refusal = next((s.refusal for s in revealed
                        if s.digest == digest and getattr(s, "refusal", None)), None)
        dissent: list[Decision] = [Penalize(c.node_id, self.task_id, Reason.DISSENT)
                                   for c, s in zip(contributions, revealed, strict=True)
                                   if not c.agreed and not self._excused(s, refusal)]
        if refusal is not None:
            self.outcome = Failed(self.task_id, Reason.REFUSED,
                                  f"{refusal}: {count} replicas refused the task identically; "
                                  "no node is at fault", digest)
            return [self.outcome, *dissent]
        ref = next((s.result_ref for s in revealed if s.digest == digest and s.result_ref), None)
        self.outcome = Verified(self.task_id, digest, self.quorum, contributions, ref)
        return [self.outcome, *dissent]

    def stopped_at_bound(self) -> tuple[set[str], set[str]]:
        """``(credibly stopped, computed)``: the nodes whose reveal was a ``runtime-bound``
        committed at least the bound after their assignment, and those whose reveal was a
        result, on a task with a bound (else both empty): what a later round's verdict
        excuses (``verifier.service``)."""
        if not self.runtime_bound_ms:
            return set(), set()
        revealed = [s for s in self._slots if s.status == Status.REVEALED]
        return ({self._node(s) for s in revealed if self._excused(s, None)},
                {self._node(s) for s in revealed if getattr(s, "refusal", None) is None})

    def _excused(self, slot: _Slot, verdict_refusal: str | None) -> bool:
        """Whether a replica that disagreed with the verdict is not judged for it: one
        stopped at the task's bound (credibly) against a result, or one with a result
        against a quorum stopped at the bound (module docstring)."""
        if not self.runtime_bound_ms:
            return False
        refusal = getattr(slot, "refusal", None)
        if verdict_refusal is None:
            return refusal == RUNTIME_BOUND and (
                getattr(slot, "committed_at", 0) - getattr(slot, "assigned_at", 0)
                >= self.runtime_bound_ms)
        return verdict_refusal == RUNTIME_BOUND and refusal is None

    def abort(self, reason: Reason, detail: str) -> list[Decision]:
        """Fail the task for a reason outside the tally (no node is judged); once."""
        return [] if self.outcome is not None else self._fail(reason, detail)

    def _fail(self, reason: Reason, detail: str) -> list[Decision]:
        self.outcome = Failed(self.task_id, reason, detail)
        return [self.outcome]

    # -- helpers --------------------------------------------------------------------------

    def _reveal_deadline(self, slot: _Slot) -> int:
        """The slot's reveal deadline, keeping its full window when the phase opened late."""
        assert self.opened_at is not None
        window = slot.reveal_deadline - slot.commit_deadline
        return max(slot.reveal_deadline, self.opened_at + window)

    def _slot_of(self, node_id: str, attempt: int) -> _Slot | RejectReason:
        """The slot ``node_id`` holds now, or why the event names no slot of this task."""
        index, held = self._used.get(node_id, (0, -1))
        slot = self._slots[index]
        if held < 0 or slot.node_id != node_id:
            return RejectReason.NOT_ASSIGNED
        return slot if attempt == held else RejectReason.WRONG_ATTEMPT

    @staticmethod
    def _node(slot: _Slot) -> str:
        assert slot.node_id is not None
        return slot.node_id

    def _reject(self, node_id: str, reason: RejectReason, detail: str) -> list[Decision]:
        return [Rejected(self.task_id, node_id, reason, detail)]

    def voters(self) -> list[tuple[str, int, int]]:
        """``(node_id, attempt, reveal_deadline)`` of each replica that committed and must reveal.

        What the adapter tells each voter when ``RevealOpened`` is decided.
        """
        if self.opened_at is None:
            return []
        return [(self._node(s), s.attempt, self._reveal_deadline(s))
                for s in self._slots if s.status == Status.COMMITTED]

    @property
    def phase(self) -> str:
        """``commit``, ``reveal`` or ``closed`` (verified or failed)."""
        if self.outcome is not None:
            return "closed"
        return "commit" if self.opened_at is None else "reveal"

    @property
    def nodes_used(self) -> tuple[str, ...]:
        """Every node ever assigned to the task, sorted: what placement must exclude."""
        return tuple(sorted(self._used))
