"""The verifier's event handling around the pure Proof of Sync tally.

Transport-free, behind the processing contract (``streams.processing``): the Kafka
runner (``streams.kafka_runner``) and the in-memory runner feed it decoded events
with the broker's append time (commits and reveals are stamped by the broker,
so a node cannot backdate them) and publish what it returns. It

* keeps each node's registered Ed25519 key (a registration must be signed by
  the key it registers, and a node id stays bound to its first key) and counts
  a commit or reveal only if its signature checks against that key;
* refuses expired and replayed commits, reveals and grants
  (``destra.freshness``);
* checks each ``DataKeyGranted`` against the submitter's key; a replica of an
  encrypted task whose grant has not come by its commit deadline is not the
  node's fault: the task fails ``no_data_key`` (refunded) and nobody is judged;
* opens one ``TaskTally`` per task at its first assignment;
* parks an event that overtook what it depends on (a commit read before its
  assignment, which travels on another topic) and replays it when that
  arrives, or dead-letters it after ``park_ms``;
* turns the tally's decisions into events: ``RevealOpened`` to each voter,
  ``TaskVerified``, ``TaskFailed``, ``ReissueRequested``, ``NodePenalized``;
  rejected events go to the dead-letter topic with their reason;
* fails a task ``refused`` when a quorum agrees on a refusal (``ResultRevealed.refusal``,
  whose digest is ``verifier.commitments.refusal_digest`` of its code): the task
  itself cannot be run, any honest node says so, so the escrow is refunded (the
  ledger refunds every ``TaskFailed``), nobody is paid and only dissenters are judged;
* runs the rounds of a task submitted with ``trust="adaptive"`` (``allocator.trust``):
  its first round is as large as the allocator's plan (one replica on a trusted node,
  two for a spot check, three while few are trusted), and any disagreement escalates
  to round ``r`` of ``2r + 1`` fresh replicas (a ``ReissueRequested`` with
  ``replicas``), up to ``TrustRules.max_rounds``, whose majority decides. The verdict
  then names every node of every round: those whose digest is the decided one are
  paid, the others penalized for dissent.
* settles a dispute of an adaptive task's first round over a checkpointed workload
  (``workloads.checkpoints``, at least ``MIN_DISPUTE_SEGMENTS`` segments) between
  exactly two digests by bisection and one re-executed segment
  instead of a round of full reruns: ``first_divergence`` over the two sides' revealed
  leaves gives the first diverging segment ``j``; for ``j > 0`` a ``CheckpointRequested``
  asks one node of each side for the exact state after segment ``j - 1``, and the first
  ``CheckpointProvided`` that hashes to the agreed leaf is the pre-state (others are
  dead-lettered with the reason); then a ``ReissueRequested`` with ``segment`` and
  ``pre_state`` asks for one referee (a round of one, 1/1), which runs that segment
  only and reveals its post-state leaf. The side whose claimed leaf it reproduces wins:
  the verdict is that side's digest, its nodes are paid in full, the other side is
  penalized for dissent and the referee is paid its segment's units. Leaves that cannot
  be bisected, no valid pre-state within ``reissue_grace_ms``, a referee that cannot be
  placed or does not reveal, or a referee leaf matching neither claim: the dispute falls
  back to a full escalation round (``_escalate``); an unchecked majority is never taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from allocator.trust import DEFAULT_RULES, TrustRules, follow_parameter
from destra.crypto import associated_data, unwrap_with, verify_event
from destra.freshness import Freshness
from schemas import Event, new_event
from schemas.bindings import data_key_commitment
from schemas.errors import DecryptionFailed, DestraError, InvalidQuorum
from streams.journal import ExpiringLog
from streams.params import ParamSchedule
from streams.processing import Context, Outcome, Recovery, dispatch
from verifier.bisection import first_divergence
from verifier.commitments import refusal_digest
from verifier.proof_of_sync import (
    Contribution,
    Decision,
    Disputed,
    Failed,
    Penalize,
    Reason,
    Reissue,
    Rejected,
    RejectReason,
    RevealOpened,
    TaskTally,
    Verified,
)
from workloads import Workload, get_workload
from workloads.base import RUNTIME_BOUND
from workloads.checkpoints import (
    HASH_BYTES,
    MAX_INLINE_STATE_BYTES,
    Checkpointed,
    state_leaf,
)

MIN_DISPUTE_SEGMENTS = 2
"""A checkpointed task of fewer segments is disputed by full rounds: with one segment the
referee would rerun the whole task, and decide it alone."""

def slash_parameter(reason: Reason) -> str:
    """The live parameter (``streams.params``) that sizes the slash for a fault: stake
    slashed, in micro-tokens (the ledger never takes more than the stake)."""
    return f"slash_{reason}_micro"

REPUTATION_LOSS_PERMILLE: dict[Reason, int] = {
    Reason.NO_SHOW: 20, Reason.NO_REVEAL: 50, Reason.DISSENT: 200,
}


@dataclass(frozen=True)
class _Terms:
    compute_units: int
    replicas: int
    quorum: int
    expires_at: int
    submitter_id: str
    submitter_key: bytes
    data_key_commitment: bytes = b""
    """The submitter's commitment to the data key (empty: none, nothing to prove against)."""
    trust: str = "fixed"
    """``fixed`` or ``adaptive`` (``TaskSubmitted.trust``)."""
    price_micro: int = 0
    """What the submitter pays (``quoted_price_micro``): an adaptive task's dissent slash
    is sized by it (``TrustRules.dissent_slash_micro``)."""
    workload: str = ""
    """The workload's name (a dispute by bisection needs it); empty in older snapshots."""
    params: tuple[tuple[str, str], ...] = ()
    """The submission's public parameters, sorted."""


@dataclass
class _Rounds:
    """An adaptive task past its first round: what the earlier rounds revealed."""

    number: int = 0
    """The round now running (or being placed)."""
    prior: list[tuple[str, bytes, str | None]] = field(default_factory=list)
    """(node, digest, result reference) of every replica that revealed in an earlier
    round."""
    used: set[str] = field(default_factory=set)
    """Every node an earlier round used: no later round may use it again."""
    stopped: set[str] = field(default_factory=set)
    """Earlier rounds' nodes credibly stopped at the task's wall-clock bound: not judged
    when a result is verified (``TaskTally.stopped_at_bound``)."""
    computed: set[str] = field(default_factory=set)
    """Earlier rounds' nodes that revealed a result on a task with a bound: not judged when
    a quorum is stopped at it."""
    asked_at: int = 0
    """When the round now being placed was asked for."""
    referees: int = 0
    """How many of the rounds so far were a dispute's referee (a round of one): a full
    round's size and the last round count only the others."""

    @property
    def full(self) -> int:
        """The number of the round now running among the full rounds (referees aside)."""
        return self.number - self.referees


def _keep_bound_outcomes(rounds: _Rounds, tally: TaskTally) -> None:
    """Note which of a finished round's replicas were credibly stopped at the task's
    bound, and which computed a result (``TaskTally.stopped_at_bound``)."""
    stopped, computed = tally.stopped_at_bound()
    if stopped or computed:
        rounds.stopped = getattr(rounds, "stopped", set()) | stopped
        rounds.computed = getattr(rounds, "computed", set()) | computed


@dataclass
class _Dispute:
    """A first round's two digests being settled by bisection and one referee."""

    round: int
    """The referee's round number."""
    segment: int
    pre_leaf: bytes | None
    """The agreed leaf of the state before ``segment`` (None for segment 0)."""
    digests: tuple[bytes, bytes]
    """Each side's task digest."""
    claims: tuple[bytes, bytes]
    """Each side's claimed leaf after ``segment``."""
    asked: dict[str, int] = field(default_factory=dict)
    """Nodes asked for the pre-state (one of each side) and the attempt they revealed."""
    refused: set[str] = field(default_factory=set)
    """Asked nodes whose answer was refused."""
    asked_at: int = 0
    pre_state: bytes | None = None
    referee_asked: bool = False
    """Whether the referee was requested (``_Rounds.asked_at`` is when)."""


@dataclass
class Verifier:
    """Proof of Sync over the network's topics; every method returns the events to publish."""

    producer_id: str
    max_attempts: int = 3
    reissue_grace_ms: int = 60_000
    park_ms: int = 60_000
    keys: dict[str, bytes] = field(default_factory=dict)
    terms: dict[str, _Terms] = field(default_factory=dict)
    tallies: dict[str, TaskTally] = field(default_factory=dict)
    """The tally of every task in flight; a verdict drops it (``closed`` answers late
    events), so the state, and its snapshot, is bounded by the work in flight."""
    open_tasks: set[str] = field(default_factory=set)
    """Tasks without a verdict yet: the only tallies the timer has to look at."""
    reputation: dict[str, int] = field(default_factory=dict)
    parked: dict[str, list[tuple[Event, Any, int]]] = field(default_factory=dict)
    """Per task, events waiting for what they depend on: (event, where, parked at)."""
    rejected: list[tuple[Event, Any, str]] = field(default_factory=list)
    """Refused events, where they came from and why: the adapter dead-letters them."""
    freshness: Freshness = field(default_factory=Freshness)
    ungranted: dict[tuple[str, str, int], int] = field(default_factory=dict)
    """Replicas of encrypted tasks still waiting for their data key: commit deadline."""
    granted: set[tuple[str, str, int]] = field(default_factory=set)
    grants: dict[tuple[str, str, int], tuple[str, bytes, bytes]] = field(default_factory=dict)
    """Each replica's first valid grant of a task with a data-key commitment: event id,
    ephemeral key, wrapped key (a node's ``DataKeyRefused`` is checked against it);
    forgotten with the task."""
    """Grants read before their assignment (the two share a partition, so rarely)."""
    closed: ExpiringLog = field(default_factory=lambda: ExpiringLog(0))
    """Tasks with a verdict (the value: when): a late event about one is refused
    (``task_closed``) for ``forget_after_ms``, after which it is refused as expired anyway.
    An expiring log (``streams.journal``): journaled, not snapshotted."""
    forget_after_ms: int = 600_000
    rules: TrustRules = DEFAULT_RULES
    params: ParamSchedule = field(default_factory=ParamSchedule)
    """The live parameters (``streams.params``): the slashes, and ``rules``' governed ones."""
    rounds: dict[str, _Rounds] = field(default_factory=dict)
    """Adaptive tasks in escalation (past their first round), until their verdict."""
    disputes: dict[str, _Dispute] = field(default_factory=dict)
    """Adaptive tasks whose dispute is being settled by bisection, until its ruling."""
    _sending_ms: int = field(default=0, init=False, repr=False)
    """Processing time of the event being handled (``Context.processing_ms``)."""
    _terms_swept_at: int = field(default=0, init=False, repr=False)
    """When ``terms`` was last swept for tasks that never got a tally (not snapshotted:
    a restarted verifier sweeps at its first tick)."""

    # -- the processing contract -------------------------------------------------------------

    name = "verifier"
    inputs = frozenset({"NodeRegistered", "TaskSubmitted", "TaskAssigned", "DataKeyGranted",
                        "ResultCommitted", "ResultRevealed", "DataKeyRefused",
                        "CheckpointProvided", "ParameterChanged"})
    recovery = Recovery.SNAPSHOT
    _SNAPSHOT_FIELDS = ("keys", "terms", "tallies", "open_tasks", "reputation", "parked",
                        "ungranted", "granted", "grants", "rounds", "disputes", "params")
    """What is bounded by the work in flight; the expiring logs (``journals``), which grow
    with the input rate, are journaled by the runner instead."""

    def __post_init__(self) -> None:
        self.closed.horizon_ms = self.forget_after_ms

    def journals(self) -> dict[str, ExpiringLog]:
        """The expiring logs: accepted event ids and closed tasks (``streams.journal``)."""
        return {"freshness": self.freshness.seen, "closed": self.closed}

    def handle(self, event: Event, ctx: Context) -> Outcome:
        """One input event (``streams.processing``): judged at its own time (the broker's,
        for commits and reveals), a reveal phase it opens counted from processing time."""
        self._sending_ms = ctx.processing_ms
        return dispatch({
            "NodeRegistered": self.on_registered, "TaskSubmitted": self.on_submitted,
            "TaskAssigned": self.on_assigned, "DataKeyGranted": self.on_granted,
            "ResultCommitted": self.on_committed, "ResultRevealed": self.on_revealed,
            "DataKeyRefused": self.on_key_refused,
            "CheckpointProvided": self.on_checkpoint, "ParameterChanged": self.on_parameter},
            self.rejected, event, ctx)

    def tick(self, ctx: Context) -> Outcome:
        """Deadlines: missed commits, reveals and grants; events parked too long."""
        self._sending_ms = ctx.processing_ms
        return dispatch({"tick": lambda e, now, where: self.on_tick(now)}, self.rejected,
                        Event("tick", {}), ctx)

    def snapshot(self) -> dict[str, Any]:
        """Every open tally and what it waits for, the node keys and reputations."""
        return {name: getattr(self, name) for name in self._SNAPSHOT_FIELDS}

    def restore(self, state: dict[str, Any]) -> None:
        """Take over a state ``snapshot`` returned."""
        for name in self._SNAPSHOT_FIELDS:
            if name in state:  # rounds, disputes, params: absent from older snapshots
                setattr(self, name, state[name])
        self.rules = self.rules.with_params(self.params.latest())
        # A snapshot from before the logs were journaled carries them: adopt them.
        if "freshness" in state:
            self.freshness.take_over(state["freshness"])
        old_closed = state.get("closed")
        if isinstance(old_closed, dict):
            for task_id, at in old_closed.items():
                self.closed.add(task_id, at + self.forget_after_ms, at)

    # -- inputs -----------------------------------------------------------------------------

    def on_parameter(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A passed proposal changed a live parameter: a slash, or a trust rule."""
        self.rules = follow_parameter(self.params, self.rules, e, self.rejected, where)
        return []

    def on_registered(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A node's keys; only a registration signed by the key it registers counts."""
        f = e.fields
        if not verify_event(e, f["signing_key"], f["node_id"]):
            self.rejected.append((e, where, "bad-signature: registration not signed by the "
                                            "key it registers"))
            return []
        bound = self.keys.get(f["node_id"])
        if bound is not None and bound != f["signing_key"]:
            self.rejected.append((e, where, f"wrong-key: {f['node_id']} is registered with "
                                            "another signing key"))
            return []
        self.keys[f["node_id"]] = f["signing_key"]
        self.reputation.setdefault(f["node_id"], 1000)
        out: list[Event] = []
        for task_id in list(self.parked):
            out += self._unpark(task_id, now_ms)
        return out

    def on_submitted(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """The task's replication terms, for the tally its first assignment opens."""
        f = e.fields
        self.terms.setdefault(f["task_id"], _Terms(
            f["compute_units"], f["replicas"], f["quorum"], e.occurred_at + f["deadline_ms"],
            f["submitter_id"], f["signing_key"], f["data_key_commitment"], f["trust"],
            f["quoted_price_micro"], f["workload"], tuple(sorted(f["params"].items()))))
        return self._unpark(f["task_id"], now_ms)

    def on_assigned(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A replica placed; opens the task's tally on its first one."""
        f = e.fields
        task_id = f["task_id"]
        if task_id in self.closed:
            self.rejected.append((e, where, f"{RejectReason.TASK_CLOSED}: {task_id} has its "
                                            "verdict"))
            return []
        tally = self.tallies.get(task_id)
        rounds = self.rounds.get(task_id)
        number = rounds.number if rounds is not None else 0
        if f["round"] != number or (rounds is not None and f["node_id"] in rounds.used):
            self.rejected.append((e, where, f"unexpected-round: {task_id} is in round {number}; "
                                            f"assignment of {f['node_id']} to round "
                                            f"{f['round']}"))
            return []
        if tally is None:
            terms = self.terms.get(task_id)
            if terms is None:
                return self._park(e, where, now_ms)
            dispute = self.disputes.get(task_id)
            referee = dispute is not None and dispute.round == number
            try:
                replicas, quorum = self._round_terms(
                    terms, rounds.full if rounds is not None else 0, f["replicas"],
                    f["quorum"], referee)
                # A referee is paid its segment, is not reissued (a lost one falls back to
                # a full round) and cannot disagree with itself.
                tally = TaskTally(
                    task_id, self._segment_units(terms) if referee else terms.compute_units,
                    replicas, quorum,
                    max_attempts=0 if referee else self.max_attempts,
                    reissue_grace_ms=self.reissue_grace_ms,
                    expires_at=terms.expires_at,
                    escalate=terms.trust == "adaptive" and not referee and (
                        rounds.full if rounds is not None else 0) < self.rules.max_rounds,
                    runtime_bound_ms=0 if referee else self._wall_bound(terms))
            except InvalidQuorum as err:
                # Terms no tally can judge (a quorum that is not a majority of the
                # replicas): the assignment is refused, the task fails so its escrow is
                # refunded, and its other assignments find it closed.
                self.rejected.append((e, where, f"invalid-quorum: {err}"))
                self.terms.pop(task_id, None)
                self.closed.add(task_id, now_ms + self.forget_after_ms, now_ms)
                return [new_event("TaskFailed", self.producer_id, task_id=task_id,
                                  reason="invalid_quorum", detail=str(err)[:2000])]
            self.tallies[task_id] = tally
            self.open_tasks.add(task_id)
        self._floored(tally)
        decisions = tally.on_assigned(f["node_id"], f["replica_index"], f["attempt"],
                                      f["commit_deadline"], f["reveal_deadline"], now_ms)
        replica = (task_id, f["node_id"], f["attempt"])
        # Only an assignment the tally took waits for its data key: a refused one
        # (unexpected_assignment) must not fail the task with no_data_key at its deadline.
        if (f["payload"] is not None or f["payload_ref"] is not None) and tally.outcome is None \
                and not _refused(decisions):
            if replica in self.granted:
                self.granted.discard(replica)
            else:
                self.ungranted[replica] = f["commit_deadline"]
        out = self._events(decisions, e, where)
        return out + self._unpark(task_id, now_ms)

    def _round_terms(self, terms: _Terms, number: int, replicas: int,
                     quorum: int, referee: bool = False) -> tuple[int, int]:
        """A round's replicas and quorum: a fixed task's are the submission's (an
        assignment may only repeat them); an adaptive task's first round is the allocator's
        plan, at least the submitter's floors; a later full round (``number`` counts those)
        is ``TrustRules.round_size``; a dispute's referee is a round of one, quorum one."""
        if terms.trust != "adaptive":
            if (replicas, quorum) not in ((0, 0), (terms.replicas, terms.quorum)):
                raise InvalidQuorum(f"a fixed task runs {terms.replicas} replicas with quorum "
                                    f"{terms.quorum}, not {replicas} with {quorum}")
            return terms.replicas, terms.quorum
        if referee:
            if (replicas, quorum) != (1, 1):
                raise InvalidQuorum(f"a referee runs alone with quorum 1, not {replicas} "
                                    f"replicas with quorum {quorum}")
            return 1, 1
        if number > 0:
            wanted = self.rules.round_size(number)
            if (replicas, quorum) != wanted:
                raise InvalidQuorum(f"round {number} runs {wanted[0]} replicas with quorum "
                                    f"{wanted[1]}, not {replicas} with {quorum}")
            return wanted
        if replicas < terms.replicas or quorum < terms.quorum:
            raise InvalidQuorum(f"{replicas} replicas with quorum {quorum} is under the "
                                f"submitter's floor of {terms.replicas} with {terms.quorum}")
        return replicas, quorum

    def _escalate(self, d: Disputed) -> list[Event]:
        """The replicas disagreed: ask for the next round, whole, on nodes not yet used."""
        tally = self.tallies.pop(d.task_id)
        self.open_tasks.discard(d.task_id)
        rounds = self.rounds.setdefault(d.task_id, _Rounds())
        rounds.prior += d.revealed
        rounds.used |= set(tally.nodes_used)
        _keep_bound_outcomes(rounds, tally)
        return self._next_round(d.task_id, rounds, tally.clock)

    def _next_round(self, task_id: str, rounds: _Rounds, now_ms: int) -> list[Event]:
        rounds.number += 1
        rounds.asked_at = now_ms
        replicas, quorum = self.rules.round_size(rounds.full)
        return [new_event("ReissueRequested", self.producer_id, task_id=task_id,
                          replica_index=0, attempt=0, exclude_node_ids=sorted(rounds.used),
                          round=rounds.number, replicas=replicas, quorum=quorum)]

    # -- disputes by bisection (``verifier.bisection``) -------------------------------------

    @staticmethod
    def _workload(terms: _Terms) -> tuple[Workload, dict[str, Any]] | None:
        """The task's workload with its public parameters validated (the private ones at
        their defaults: a workload's segments, costs and bound depend on its public
        parameters only); None when the terms name none, or they do not validate."""
        if not getattr(terms, "workload", ""):
            return None
        try:
            workload = get_workload(terms.workload)
            return workload, workload.validate(dict(terms.params))
        except (DestraError, KeyError):
            return None

    def _checkpointed(self, terms: _Terms) -> tuple[Checkpointed, dict[str, Any]] | None:
        """``_workload`` as a checkpointed one; None when it has no checkpoints."""
        found = self._workload(terms)
        if found is None or not isinstance(found[0], Checkpointed):
            return None
        return found[0], found[1]

    def _wall_bound(self, terms: _Terms) -> int:
        """The wall-clock bound nodes stop the task at (``Workload.wall_bound_ms``); 0 when
        it has none or its terms do not validate."""
        found = self._workload(terms)
        return found[0].wall_bound_ms(found[1]) if found is not None else 0

    def _segment_units(self, terms: _Terms) -> int:
        found = self._checkpointed(terms)
        return max(1, found[0].segment_units(found[1])) if found is not None else 1

    def _dispute(self, d: Disputed) -> list[Event] | None:
        """Start settling a first round's dispute by bisection; None when it cannot be
        (then it escalates by full rounds)."""
        terms = self.terms.get(d.task_id)
        if terms is None or terms.trust != "adaptive" or d.task_id in self.rounds:
            return None
        found = self._checkpointed(terms)
        digests = list(dict.fromkeys(digest for _, digest, _ in d.revealed))
        if found is None or len(digests) != 2 or len(d.checkpoints) != len(d.revealed):
            return None
        workload, params = found
        n = workload.segments(params)
        if n < MIN_DISPUTE_SEGMENTS:
            return None
        sides: list[tuple[str, int, tuple[bytes, ...]]] = []
        for digest in digests:  # each side's first replica whose leaves can be walked
            side = next(((node, attempt, leaves) for (node, dg, _), leaves, attempt
                         in zip(d.revealed, d.checkpoints, d.attempts or (0,) * len(d.revealed),
                                strict=True)
                         if dg == digest and len(leaves) == n
                         and all(len(leaf) == HASH_BYTES for leaf in leaves)), None)
            if side is None:
                return None
            sides.append(side)
        result = first_divergence(list(sides[0][2]), list(sides[1][2]))
        if result.divergent_leaf is None or result.losers:
            return None  # the same leaves for two digests: nothing to re-execute
        tally = self.tallies.pop(d.task_id)
        self.open_tasks.discard(d.task_id)
        rounds = self.rounds.setdefault(d.task_id, _Rounds())
        rounds.prior += d.revealed
        rounds.used |= set(tally.nodes_used)
        _keep_bound_outcomes(rounds, tally)
        rounds.number += 1
        rounds.referees += 1
        rounds.asked_at = tally.clock
        segment = result.divergent_leaf
        dispute = _Dispute(rounds.number, segment, result.pre_leaf,
                           (digests[0], digests[1]),
                           (result.claims["a"], result.claims["b"]), asked_at=tally.clock)
        self.disputes[d.task_id] = dispute
        if segment == 0:  # the referee derives the initial state from the parameters
            return self._ask_referee(d.task_id, tally.clock)
        out = []
        for node, attempt, _ in sides:
            dispute.asked[node] = attempt
            out.append(new_event("CheckpointRequested", self.producer_id, task_id=d.task_id,
                                 node_id=node, attempt=attempt, checkpoint=segment - 1,
                                 reply_by=tally.clock + self.reissue_grace_ms))
        return out

    def _ask_referee(self, task_id: str, now_ms: int) -> list[Event]:
        dispute, rounds = self.disputes[task_id], self.rounds[task_id]
        dispute.referee_asked = True
        rounds.asked_at = now_ms
        return [new_event("ReissueRequested", self.producer_id, task_id=task_id,
                          replica_index=0, attempt=0, exclude_node_ids=sorted(rounds.used),
                          round=dispute.round, replicas=1, quorum=1, segment=dispute.segment,
                          pre_state=dispute.pre_state)]

    def _fall_back(self, task_id: str, now_ms: int) -> list[Event]:
        """The dispute cannot be settled by a referee: a full round decides instead. A
        referee that took part is neither paid nor judged; it is not used again."""
        self.disputes.pop(task_id, None)
        tally = self.tallies.pop(task_id, None)
        self.open_tasks.discard(task_id)
        rounds = self.rounds[task_id]
        if tally is not None:
            rounds.used |= set(tally.nodes_used)
        return self._next_round(task_id, rounds, now_ms)

    def _ruling(self, d: Verified) -> tuple[Verified, list[Penalize]] | None:
        """The referee revealed its post-state leaf: the side whose claim it reproduces
        wins (its digest is the verdict, with its result); None when it matches neither."""
        dispute = self.disputes[d.task_id]
        if d.digest not in dispute.claims:
            return None
        digest = dispute.digests[dispute.claims.index(d.digest)]
        rounds = self.rounds[d.task_id]
        ref = next((r for _, dg, r in rounds.prior if dg == digest and r), None)
        return self._verdict(Verified(d.task_id, digest, d.quorum, d.contributions, ref))

    def on_checkpoint(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A node's signed ``CheckpointProvided``: the first that hashes to the dispute's
        agreed leaf is the referee's pre-state; anything else is dead-lettered."""
        f = e.fields
        task_id, node_id = f["task_id"], f["node_id"]
        if task_id in self.closed:
            self.rejected.append((e, where, f"{RejectReason.TASK_CLOSED}: {task_id} has its "
                                            "verdict"))
            return []
        dispute = self.disputes.get(task_id)
        if dispute is None:
            self.rejected.append((e, where, f"no-dispute: {task_id} waits for no checkpoint"))
            return []
        key = self.keys.get(node_id)
        if key is None or not verify_event(e, key, node_id):
            self.rejected.append((e, where, f"bad-signature: checkpoint for {task_id} not "
                                            f"signed by node {node_id}'s registered key"))
            return []
        if dispute.asked.get(node_id) != f["attempt"] or \
                f["checkpoint"] != dispute.segment - 1:
            self.rejected.append((e, where, f"unexpected-checkpoint: {node_id} (attempt "
                                            f"{f['attempt']}) was not asked for checkpoint "
                                            f"{f['checkpoint']} of {task_id}"))
            return []
        refusal = self.freshness.refusal(e, now_ms)
        if refusal is not None:
            self.rejected.append((e, where, refusal))
            return []
        terms = self.terms.get(task_id)
        found = self._checkpointed(terms) if terms is not None else None
        why = None
        if found is None:
            why = "the task's workload has no checkpoints"
        elif len(f["state"]) > MAX_INLINE_STATE_BYTES:
            why = f"the state is over {MAX_INLINE_STATE_BYTES} bytes"
        else:
            try:
                if state_leaf(found[0], f["state"]) != dispute.pre_leaf:
                    why = "the state does not hash to the agreed leaf"
            except DestraError as err:
                why = f"the state is no state of this task: {err}"
        self.freshness.accept(e)
        if why is not None:
            self.rejected.append((e, where, f"bad-checkpoint: {node_id}'s checkpoint "
                                            f"{f['checkpoint']} of {task_id}: {why}"))
            dispute.refused.add(node_id)
            if dispute.pre_state is None and dispute.refused >= set(dispute.asked):
                # nobody left to give a valid one
                return self._fall_back(task_id, now_ms)
            return []
        if dispute.pre_state is not None:
            return []  # another side's state was taken already
        dispute.pre_state = bytes(f["state"])
        return self._ask_referee(task_id, now_ms)

    @staticmethod
    def _unplaced(task_id: str, rounds: _Rounds) -> list[Decision]:
        """A round the allocator could not place in ``reissue_grace_ms`` (no fresh
        operator is free, or none is left): the task fails, refunded, and nobody is judged.
        The replicas so far disagreed, and their majority is exactly what colluders can
        make: it is not taken."""
        return [Failed(task_id, Reason.NO_QUORUM,
                       f"round {rounds.number} could not be placed within the grace period: "
                       f"{len(rounds.prior)} replicas so far disagree")]

    def _verdict(self, d: Verified) -> tuple[Verified, list[Penalize]]:
        """The verdict of the task's last round with the earlier rounds' replicas added:
        agreeing with the decided digest is paid, anything else is dissent."""
        rounds = self.rounds.get(d.task_id)
        if rounds is None:
            return d, []
        terms = self.terms.get(d.task_id)
        units = terms.compute_units if terms is not None else 0
        prior = tuple(Contribution(node, units if digest == d.digest else 0,
                                   digest == d.digest) for node, digest, _ in rounds.prior)
        stopped: set[str] = getattr(rounds, "stopped", set())  # absent from older snapshots
        dissent = [Penalize(c.node_id, d.task_id, Reason.DISSENT) for c in prior
                   if not c.agreed and c.node_id not in stopped]
        return Verified(d.task_id, d.digest, d.quorum, prior + d.contributions,
                        d.result_ref), dissent

    def _refused_dissent(self, d: Failed) -> list[Penalize]:
        """A quorum of the task's last round refused it: the earlier rounds' replicas that
        revealed anything else dissented, as they would from a verified digest, except a
        result against a quorum stopped at the task's bound (``_Rounds.computed``)."""
        rounds = self.rounds.get(d.task_id)
        if rounds is None:
            return []
        computed: set[str] = (getattr(rounds, "computed", set())  # older snapshots lack it
                              if d.digest == refusal_digest(RUNTIME_BOUND) else set())
        return [Penalize(node, d.task_id, Reason.DISSENT)
                for node, digest, _ in rounds.prior if digest != d.digest
                and node not in computed]

    def on_granted(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A submitter's signed ``DataKeyGranted``: the replica may now run."""
        f = e.fields
        if f["task_id"] in self.closed:
            # Nothing to run, and said so: a late grant, a replay, or someone else's key.
            self.rejected.append((e, where, f"{RejectReason.TASK_CLOSED}: {f['task_id']} has "
                                            "its verdict"))
            return []
        terms = self.terms.get(f["task_id"])
        if terms is None:
            return self._park(e, where, now_ms)
        if not verify_event(e, terms.submitter_key, terms.submitter_id):
            self.rejected.append((e, where, f"bad-signature: grant for {f['task_id']} not "
                                            f"signed by its submitter {terms.submitter_id}"))
            return []
        refusal = self.freshness.refusal(e, now_ms)
        if refusal is not None:
            self.rejected.append((e, where, refusal))
            return []
        self.freshness.accept(e)
        replica = (f["task_id"], f["node_id"], f["attempt"])
        if self.ungranted.pop(replica, None) is None:
            self.granted.add(replica)
        if terms.data_key_commitment:  # what a node's refusal of it is checked against
            self.grants.setdefault(replica, (e.event_id, f["ephemeral_public_key"],
                                             f["wrapped_key"]))
        return []

    def on_key_refused(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A node's proof that the key it was granted misses the submitter's commitment:
        the grant's key-encryption key. When it opens the grant to a key that is not the
        one committed to, the task fails ``bad_data_key`` (refunded) and no node is judged;
        any other claim is refused with the reason."""
        f = e.fields
        task_id, node_id = f["task_id"], f["node_id"]
        if task_id in self.closed:
            return []
        tally, terms = self.tallies.get(task_id), self.terms.get(task_id)
        if tally is None or terms is None:
            return self._park(e, where, now_ms)
        key = self.keys.get(node_id)
        if key is None or not verify_event(e, key, node_id):
            self.rejected.append((e, where, f"bad-signature: key refusal for {task_id} not "
                                            f"signed by node {node_id}'s registered key"))
            return []
        grant = self.grants.get((task_id, node_id, f["attempt"]))
        why = None
        if not terms.data_key_commitment:
            why = "the submission carries no data-key commitment to prove against"
        elif grant is None or grant[0] != f["grant_id"]:
            why = f"no grant {f['grant_id']} to {node_id} (attempt {f['attempt']}) seen"
        else:
            try:
                data_key = unwrap_with(f["grant_key"], grant[2],
                                       associated_data("grant", task_id, node_id,
                                                       f["attempt"]))
            except DecryptionFailed:
                why = "the key given does not open the grant"
            else:
                if data_key_commitment(task_id, data_key) == terms.data_key_commitment:
                    why = "the granted key matches the submitter's commitment"
        if why is not None:
            self.rejected.append((e, where, f"unproven-key-refusal: {why}"))
            return []
        self.ungranted.pop((task_id, node_id, f["attempt"]), None)
        return self._events(tally.abort(
            Reason.BAD_DATA_KEY, f"the submitter granted {node_id} (attempt {f['attempt']}) "
            f"a data key that does not match its commitment (grant {f['grant_id']}); no node "
            "is at fault"), e, where)

    def on_committed(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A signed commitment."""
        f = e.fields
        tally = self._tally_for(e, where, now_ms)
        if tally is None:
            return []
        decisions = tally.on_committed(f["node_id"], f["attempt"], f["commitment"], now_ms)
        if self._not_yet_assigned(tally, decisions, f["node_id"]):
            return self._park(e, where, now_ms)
        if not _refused(decisions):  # a refused event is not spent: its copy may still count
            self.freshness.accept(e)
        return self._events(decisions, e, where)

    def on_revealed(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A signed reveal of salt and digest."""
        f = e.fields
        tally = self._tally_for(e, where, now_ms)
        if tally is None:
            return []
        decisions = tally.on_revealed(f["node_id"], f["attempt"], f["salt"], f["digest"],
                                      f["runtime_ms"], now_ms, f["result_ref"],
                                      f["checkpoints"], f.get("refusal"))
        if self._not_yet_assigned(tally, decisions, f["node_id"]):
            return self._park(e, where, now_ms)
        if not _refused(decisions):  # a refused event is not spent: its copy may still count
            self.freshness.accept(e)
        return self._events(decisions, e, where)

    def on_tick(self, now_ms: int) -> list[Event]:
        """Judge missed deadlines; dead-letter events parked too long."""
        out: list[Event] = []
        for replica, deadline in list(self.ungranted.items()):
            task_id, node_id, attempt = replica
            tally = self.tallies.get(task_id)
            if tally is None or tally.outcome is not None:
                del self.ungranted[replica]
            elif now_ms > deadline:
                del self.ungranted[replica]
                out += self._events(tally.abort(
                    Reason.NO_DATA_KEY, f"the submitter did not grant the data key to "
                    f"{node_id} (attempt {attempt}) by its commit deadline {deadline}; no node "
                    "is at fault"), None, None)
        for task_id in list(self.open_tasks):
            out += self._events(self.tallies[task_id].on_tick(now_ms), None, None)
        for task_id, rounds in list(self.rounds.items()):
            terms = self.terms.get(task_id)
            if task_id in self.tallies or terms is None:
                continue
            dispute = self.disputes.get(task_id)
            if now_ms > terms.expires_at:
                out += self._events([Failed(task_id, Reason.DEADLINE_PASSED,
                                            f"round {rounds.number} not placed by "
                                            f"{terms.expires_at}")], None, None)
            elif dispute is not None and not dispute.referee_asked:
                if now_ms > dispute.asked_at + self.reissue_grace_ms:  # no valid pre-state
                    out += self._fall_back(task_id, now_ms)
            elif now_ms > rounds.asked_at + self.reissue_grace_ms:
                out += (self._fall_back(task_id, now_ms) if dispute is not None
                        else self._events(self._unplaced(task_id, rounds), None, None))
        self.freshness.prune(now_ms)
        self.closed.prune(now_ms)  # in closing order, near enough time order
        if now_ms - self._terms_swept_at >= self.park_ms:
            # A task failed before any assignment (rejected by the ledger, invalid or no
            # capacity at the allocator) never opens a tally, so ``closed`` never forgets
            # its terms: forget them once no assignment can come (past its deadline, and
            # past the allocator's queue timeout, by ``forget_after_ms``).
            self._terms_swept_at = now_ms
            for task_id, terms in list(self.terms.items()):
                if task_id not in self.tallies and now_ms > terms.expires_at + self.forget_after_ms:
                    del self.terms[task_id]
        for task_id, waiting in list(self.parked.items()):
            keep = []
            for event, where, since in waiting:
                if now_ms - since > self.park_ms:
                    self.rejected.append((event, where, f"{RejectReason.NOT_ASSIGNED}: no "
                                          f"assignment, submission or node key for it "
                                          f"within {self.park_ms} ms"))
                else:
                    keep.append((event, where, since))
            if keep:
                self.parked[task_id] = keep
            else:
                del self.parked[task_id]
        return out

    # -- helpers ----------------------------------------------------------------------------

    def _clock_of(self, task_id: str) -> int:
        tally = self.tallies.get(task_id)
        return tally.clock if tally is not None else self._sending_ms

    def _floored(self, tally: TaskTally) -> TaskTally:
        tally.send_floor_ms = max(tally.send_floor_ms, self._sending_ms)
        return tally

    def _tally_for(self, e: Event, where: Any, now_ms: int) -> TaskTally | None:
        """The event's tally once its signature checks; parks or rejects otherwise."""
        f = e.fields
        if f["task_id"] in self.closed:
            self.rejected.append((e, where, f"{RejectReason.TASK_CLOSED}: {f['task_id']} has "
                                            "its verdict"))
            return None
        rounds = self.rounds.get(f["task_id"])
        if rounds is not None and f["node_id"] in rounds.used:
            self.rejected.append((e, where, f"round-closed: {f['node_id']}'s round of "
                                            f"{f['task_id']} has ended"))
            return None
        key = self.keys.get(f["node_id"])
        tally = self.tallies.get(f["task_id"])
        if key is None or tally is None:
            self._park(e, where, now_ms)
            return None
        if not verify_event(e, key, f["node_id"]):
            self.rejected.append((e, where, f"bad-signature: {e.name} not signed by the "
                                            f"registered key of {f['node_id']}"))
            return None
        refusal = self.freshness.refusal(e, now_ms)
        if refusal is not None:
            self.rejected.append((e, where, refusal))
            return None
        return self._floored(tally)

    @staticmethod
    def _not_yet_assigned(tally: TaskTally, decisions: list[Decision], node_id: str) -> bool:
        """A rejection only because the node's assignment has not been read yet."""
        return (len(decisions) > 0 and isinstance(decisions[-1], Rejected)
                and decisions[-1].reason == RejectReason.NOT_ASSIGNED
                and node_id not in tally.nodes_used and tally.outcome is None)

    def _park(self, e: Event, where: Any, now_ms: int) -> list[Event]:
        self.parked.setdefault(e.fields["task_id"], []).append((e, where, now_ms))
        return []

    def _unpark(self, task_id: str, now_ms: int) -> list[Event]:
        waiting = self.parked.pop(task_id, [])
        out: list[Event] = []
        for event, where, since in waiting:
            handler = {"TaskAssigned": self.on_assigned, "ResultCommitted": self.on_committed,
                       "ResultRevealed": self.on_revealed,
                       "DataKeyGranted": self.on_granted,
                       "DataKeyRefused": self.on_key_refused}[event.name]
            # Judged at the time it arrived, not when it was unparked (a tally's clock
            # never goes back, so this only matters if no tick passed meanwhile).
            out += handler(event, since, where)
        return out

    def _events(self, decisions: list[Decision], source: Event | None,
                where: Any) -> list[Event]:
        out: list[Event] = []
        closing: list[str] = []
        expanded: list[Decision] = []
        for d in decisions:
            dispute = self.disputes.get(d.task_id) if isinstance(d, Verified | Failed) \
                else None
            if isinstance(d, Verified) and dispute is not None:  # the referee's leaf
                ruled = self._ruling(d)
                if ruled is None:  # it reproduced neither claim
                    out += self._fall_back(d.task_id, self._clock_of(d.task_id))
                else:
                    expanded += [ruled[0], *ruled[1]]
            elif isinstance(d, Failed) and dispute is not None and d.reason in (
                    Reason.NO_QUORUM, Reason.REFUSED):  # the referee lost, or refused
                out += self._fall_back(d.task_id, self._clock_of(d.task_id))
            elif isinstance(d, Verified):  # with the earlier rounds' replicas, if any
                verdict, dissent = self._verdict(d)
                expanded += [verdict, *dissent]
            elif isinstance(d, Failed) and d.reason == Reason.REFUSED:
                expanded += [d, *self._refused_dissent(d)]
            else:
                expanded.append(d)
        for d in expanded:
            if isinstance(d, Verified | Failed):
                self.open_tasks.discard(d.task_id)
                tally = self.tallies.get(d.task_id)
                at = tally.clock if tally is not None else self._sending_ms
                self.closed.add(d.task_id, at + self.forget_after_ms, at)
                closing.append(d.task_id)
            if isinstance(d, Verified):
                out.append(new_event(
                    "TaskVerified", self.producer_id, task_id=d.task_id, digest=d.digest,
                    quorum=d.quorum, result_ref=d.result_ref,
                    contributions=[{"node_id": c.node_id, "compute_units": c.compute_units,
                                    "agreed": c.agreed} for c in d.contributions]))
            elif isinstance(d, RevealOpened):
                out += [new_event("RevealOpened", self.producer_id, task_id=d.task_id,
                                  node_id=node, attempt=attempt, opened_at=d.opened_at_ms,
                                  reveal_deadline=deadline)
                        for node, attempt, deadline in self.tallies[d.task_id].voters()]
            elif isinstance(d, Reissue):
                rounds = self.rounds.get(d.task_id)
                out.append(new_event(
                    "ReissueRequested", self.producer_id, task_id=d.task_id,
                    replica_index=d.replica_index, attempt=d.attempt,
                    exclude_node_ids=sorted(set(d.exclude_node_ids)
                                            | (rounds.used if rounds else set())),
                    round=rounds.number if rounds else 0))
            elif isinstance(d, Disputed):
                out += self._dispute(d) or self._escalate(d)
            elif isinstance(d, Penalize):
                rep = max(0, self.reputation.get(d.node_id, 1000)
                          - REPUTATION_LOSS_PERMILLE[d.reason])
                self.reputation[d.node_id] = rep
                slash = self.params.value(slash_parameter(d.reason), self._sending_ms)
                terms = self.terms.get(d.task_id)
                if d.reason == Reason.DISSENT and terms is not None and terms.trust == "adaptive":
                    slash = self.rules.dissent_slash_micro(terms.price_micro, slash)
                out.append(new_event("NodePenalized", self.producer_id, node_id=d.node_id,
                                     task_id=d.task_id, reason=str(d.reason),
                                     slash_micro=slash, reputation_permille=rep))
            elif isinstance(d, Failed):
                out.append(new_event("TaskFailed", self.producer_id, task_id=d.task_id,
                                     reason=str(d.reason), detail=d.detail[:2000]))
            elif isinstance(d, Rejected) and source is not None:
                self.rejected.append((source, where, f"{d.reason}: {d.detail}".rstrip(": ")))
        for task_id in closing:  # a verdict is final: only the closed mark stays
            self.tallies.pop(task_id, None)
            self.terms.pop(task_id, None)
            self.rounds.pop(task_id, None)
            self.disputes.pop(task_id, None)
        if closing and self.grants:
            done = set(closing)
            for replica in [r for r in self.grants if r[0] in done]:
                del self.grants[replica]
        return out


def _refused(decisions: list[Any]) -> bool:
    """Whether the tally refused the event these decisions answer."""
    return any(isinstance(d, Rejected) for d in decisions)
