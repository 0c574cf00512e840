"""``destra audit``: replay the whole log through the services' own handlers and compare.

Pure: it takes the decoded events of every topic, each with where it was
(topic, partition, offset) and its record timestamp, and returns the
discrepancies between what the services emitted and what they should have
emitted given their inputs. No Kafka here (``destra.cli`` reads the topics).

What is re-derived, and how:

* **Authority.** Every event only a service may emit (``streams.authority``)
  must pass ``Genesis.check``; one that does not is named (consumers refuse it,
  but it should not be on the log at all). Such events take no further part in
  the audit, as they took none in the live network.
* **Ledger.** A fresh ``LedgerDecider`` is fed its inputs from the log (the
  genesis-checked ones, in log order) through the processing contract. The money
  it posts is compared by content (transaction id, account, amount, kind; the
  entries' event ids differ from run to run) with the ``LedgerEntryPosted``
  events on the log, and its rejections (``TaskFailed``) with the ledger's.
* **Verdicts and penalties.** A fresh ``Verifier`` is fed its inputs (node
  registrations, submissions, the logged assignments, grants, signed commits and
  reveals) at their record timestamps (the broker's append time for commits and
  reveals), ticked at every record time and at every deadline, and its
  ``TaskVerified`` (digest, quorum, who agreed and is paid), ``NodePenalized``
  (node, task, reason, slash), ``TaskFailed``, ``ReissueRequested`` and
  ``RevealOpened`` (node, attempt) are compared with the logged ones.
* **Placements.** The allocator's placements come from a model that refits in
  the background, so they are not re-executed; each ``TaskAssigned`` is checked
  against its constraints instead: an escrowed, submitted task whose terms it
  copies faithfully, a registered node, a replica index within the task's
  replicas, attempt 0 or one the verifier asked to reissue, never a node or an
  operator the task already used, the node's tier and memory enough for the task,
  one device class for a homogeneous task's first placement (the submission asked, or
  the workload's rule for its parameters, ``Workload.homogeneous``), and never more
  replicas outstanding on a node than its slots. The allocator's ``TaskFailed``
  are checked too (``invalid-task`` only when the workload refuses the task,
  ``no-capacity`` only for a task never placed), and an escrowed task that was
  neither placed nor failed long after its queue timeout is named as missing.

Order: records are replayed by timestamp, then (within one millisecond) by the
causal order of their types (a submission before its escrow before its
assignment before its commits...), then topic, partition and offset.

What it cannot re-derive: which nodes the allocator should have chosen (only
that its choice was allowed), node liveness at placement time, the exact commit
windows, reputations in ``NodePenalized``, and the instant the live verifier's
clock opened a reveal phase late (it ticks on the wall clock; the replay ticks at
each deadline, so a late-opened phase's stretched reveal deadlines may differ by
the live tick's lag).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from allocator.pricing import effective_tier, tier_of
from allocator.trust import DEFAULT_RULES, TrustRules
from ledger.decider import LedgerDecider
from schemas import Event
from schemas.errors import DestraError
from schemas.signatures import verify_event
from streams.authority import AUTHORITY, Genesis
from streams.params import ParamSchedule
from streams.processing import Context, Origin, Processor
from verifier.service import Verifier
from workloads import get_workload

CAUSAL_RANK: dict[str, int] = {name: rank for rank, name in enumerate((
    "PriceUpdated", "ParameterChanged", "AccountRegistered", "TokensMinted", "NodeRegistered",
    "NodeHeartbeat", "AccountOperation", "ProposalSubmitted", "TaskSubmitted",
    "LedgerEntryPosted", "TaskAssigned", "DataKeyGranted", "DataKeyRefused", "ResultCommitted",
    "ReissueRequested", "RevealOpened", "ResultRevealed", "TaskVerified", "NodePenalized",
    "TaskFailed", "ProposalDecided"))}
"""Within one millisecond, the order in which events of these types can cause each other."""

VERIFIER_FAILURES = frozenset({"no_quorum", "deadline_passed", "no_data_key", "bad_data_key",
                               "refused"})
ALLOCATOR_FAILURES = frozenset({"invalid-task", "no-capacity"})


@dataclass(frozen=True)
class Record:
    """One decoded event and where it was read."""

    event: Event
    topic: str
    partition: int
    offset: int
    timestamp: int
    """The record's timestamp (the broker's append time on ``broker_time`` topics)."""

    @property
    def where(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True)
class Discrepancy:
    """One event the services emitted that the replay would not have, or the reverse."""

    check: str
    """``authority``, ``ledger``, ``verifier`` or ``allocator``."""
    kind: str
    """``unauthenticated`` (fails the genesis check), ``unexpected`` (emitted, not
    re-derived), ``missing`` (re-derived, not emitted) or ``constraint`` (a placement
    that breaks a rule)."""
    event_type: str
    event_id: str | None
    """The logged event's id; for ``missing``, the id of the input that causes it."""
    where: str | None
    """topic/partition/offset of that event."""
    task_id: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "kind": self.kind, "event_type": self.event_type,
                "event_id": self.event_id, "where": self.where, "task_id": self.task_id,
                "reason": self.reason}

    def __str__(self) -> str:
        named = f"{self.event_type} {self.event_id or '-'} at {self.where or '-'}"
        return f"[{self.check}] {self.kind}: {named}: {self.reason}"


@dataclass(frozen=True)
class AuditConfig:
    """The services' settings the replay must share with the live run."""

    max_attempts: int = 3
    """``DESTRA_MAX_REISSUES``."""
    reissue_grace_ms: int = 60_000
    """``DESTRA_REISSUE_GRACE_MS``."""
    queue_timeout_ms: int = 120_000
    """``DESTRA_QUEUE_TIMEOUT_MS``."""
    params: Mapping[str, int] = field(default_factory=dict)
    """The network's start values of its live parameters (``streams.params.params_from``,
    ``DESTRA_PARAM_*``); the changes governance made are on the log."""
    network: str = ""
    """The topic prefix: the network stake consents are bound to."""
    unplaced_grace_ms: int = 60_000
    """How long past its queue timeout an escrowed task may still be unplaced and
    unfailed before it is named (the allocator judges on its own ticks)."""
    rules: TrustRules = DEFAULT_RULES
    """Adaptive trust's rules (``DESTRA_PARAM_TRUSTED_AFTER``, ``DESTRA_PARAM_SPOT_*``): round sizes
    and dissent slashes depend on them."""


@dataclass
class AuditReport:
    """What ``audit`` found."""

    records: int
    discrepancies: list[Discrepancy]
    checked: dict[str, int] = field(default_factory=dict)
    """How many events of each kind were re-derived or checked."""

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "discrepancies": len(self.discrepancies),
                "checked": self.checked, "findings": [d.as_dict() for d in self.discrepancies]}


# -- the replay ----------------------------------------------------------------------------


def log_order(records: Iterable[Record]) -> list[Record]:
    """The records in the order the audit replays them."""
    return sorted(records, key=lambda r: (r.timestamp, CAUSAL_RANK.get(r.event.name, 99),
                                          r.topic, r.partition, r.offset))


@dataclass(frozen=True)
class _Emitted:
    event: Event
    cause: Record | None
    at_ms: int


def _replay(processor: Processor, ordered: Sequence[Record], valid: Callable[[Record], bool],
            tick_at: Iterable[int] = ()) -> list[_Emitted]:
    """Feed ``processor`` its inputs through the contract; every event it emits, with cause.

    Ticked before each record at the record's time (every record stamped earlier has
    been handled: a watermark), and at each of ``tick_at`` up to the log's end.
    """
    end = ordered[-1].timestamp if ordered else 0
    ticks = sorted({t for t in tick_at if t <= end} | {r.timestamp for r in ordered})
    out: list[_Emitted] = []
    next_tick = 0
    for r in ordered:
        while next_tick < len(ticks) and ticks[next_tick] <= r.timestamp:
            now = ticks[next_tick]
            out += [_Emitted(e, None, now) for e in processor.tick(Context(now)).emit]
            next_tick += 1
        if r.event.name not in processor.inputs or not valid(r):
            continue
        ctx = Context(r.timestamp, origin=Origin(r.topic, r.partition, r.offset, None))
        out += [_Emitted(e, r, r.timestamp) for e in processor.handle(r.event, ctx).emit]
    for now in ticks[next_tick:]:
        out += [_Emitted(e, None, now) for e in processor.tick(Context(now)).emit]
    return out


def _compare(check: str, logged: Sequence[Record], derived: Sequence[_Emitted],
             key: Callable[[Event], Hashable],
             explain: Callable[[Event, list[Event]], str],
             describe: Callable[[Event], str]) -> list[Discrepancy]:
    """Logged events against re-derived ones, as multisets of ``key``."""
    want = Counter(key(d.event) for d in derived)
    have = Counter(key(r.event) for r in logged)
    derived_by_task: dict[str | None, list[Event]] = defaultdict(list)
    for d in derived:
        derived_by_task[d.event.fields.get("task_id")].append(d.event)
    out = []
    extra = have - want
    for r in logged:
        k = key(r.event)
        if extra[k] > 0:
            extra[k] -= 1
            same = [e for e in derived_by_task.get(r.event.fields.get("task_id"), [])
                    if e.name == r.event.name]
            out.append(Discrepancy(check, "unexpected", r.event.name, r.event.event_id, r.where,
                                   r.event.fields.get("task_id"), explain(r.event, same)))
    missing = want - have
    for d in derived:
        k = key(d.event)
        if missing[k] > 0:
            missing[k] -= 1
            cause = d.cause
            because = (f"caused by {cause.event.name} {cause.event.event_id} at {cause.where}"
                       if cause is not None else f"decided by the deadlines at {d.at_ms}")
            out.append(Discrepancy(check, "missing", d.event.name,
                                   cause.event.event_id if cause else None,
                                   cause.where if cause else None,
                                   d.event.fields.get("task_id"),
                                   f"the replay emits {describe(d.event)}, the log has no such "
                                   f"event ({because})"))
    return out


# -- keys and descriptions of the services' outputs -----------------------------------------


def _contributions(e: Event) -> tuple[tuple[str, int, bool], ...]:
    return tuple(sorted((c["node_id"], c["compute_units"], c["agreed"])
                        for c in e.fields["contributions"]))


def _agreed(e: Event) -> list[str]:
    return sorted(c["node_id"] for c in e.fields["contributions"] if c["agreed"])


def _verifier_key(e: Event) -> Hashable:
    f = e.fields
    if e.name == "TaskVerified":
        return (e.name, f["task_id"], bytes(f["digest"]), f["quorum"], f["result_ref"],
                _contributions(e))
    if e.name == "NodePenalized":
        return (e.name, f["task_id"], f["node_id"], f["reason"], f["slash_micro"])
    if e.name == "ReissueRequested":
        return (e.name, f["task_id"], f["replica_index"], f["attempt"],
                tuple(sorted(f["exclude_node_ids"])))
    if e.name == "RevealOpened":
        return (e.name, f["task_id"], f["node_id"], f["attempt"])
    return (e.name, f["task_id"], f["reason"])  # TaskFailed


def _describe(e: Event) -> str:
    f = e.fields
    if e.name == "TaskVerified":
        return (f"TaskVerified of task {f['task_id']} with digest {bytes(f['digest']).hex()[:16]}"
                f" paying {_agreed(e)}")
    if e.name == "NodePenalized":
        return (f"NodePenalized of {f['node_id']} on task {f['task_id']} for {f['reason']} "
                f"({f['slash_micro']} micro)")
    if e.name == "ReissueRequested":
        return (f"ReissueRequested of task {f['task_id']} replica {f['replica_index']} "
                f"attempt {f['attempt']}")
    if e.name == "RevealOpened":
        return f"RevealOpened to {f['node_id']} (attempt {f['attempt']}) on task {f['task_id']}"
    if e.name == "LedgerEntryPosted":
        return (f"LedgerEntryPosted {f['transaction_id']}: {f['amount_micro']:+} to "
                f"{f['account']} ({f['kind']})")
    return f"{e.name} of task {f.get('task_id')} ({f.get('reason')})"


def _explain_verifier(e: Event, same: list[Event]) -> str:
    f = e.fields
    if e.name == "TaskVerified":
        if not same:
            return (f"the evidence (signed commits and reveals) yields no verdict for task "
                    f"{f['task_id']} paying {_agreed(e)}")
        other = same[0]
        if bytes(other.fields["digest"]) != bytes(f["digest"]):
            return (f"the quorum revealed digest {bytes(other.fields['digest']).hex()[:16]}, "
                    f"this verdict says {bytes(f['digest']).hex()[:16]}")
        return (f"pays {_agreed(e)} but the nodes whose valid reveals agreed are "
                f"{_agreed(other)} (contributions {list(_contributions(e))} vs "
                f"{list(_contributions(other))})")
    if e.name == "NodePenalized":
        faults = [(o.fields["node_id"], o.fields["reason"]) for o in same]
        return (f"no {f['reason']} by {f['node_id']} on task {f['task_id']} in the evidence "
                f"(the replay judges {faults or 'no fault'} on this task)")
    if e.name == "TaskFailed":
        return (f"the evidence does not fail task {f['task_id']} for {f['reason']} "
                f"(the replay's verifier failures: {[o.fields['reason'] for o in same] or 'none'})")
    return f"the replay of the verifier emits no {_describe(e)}"


def _entry_key(e: Event) -> Hashable:
    f = e.fields
    return (f["transaction_id"], f["account"], f["amount_micro"], f["kind"])


def _ledger_key(e: Event) -> Hashable:
    return _entry_key(e) if e.name == "LedgerEntryPosted" else (e.fields["task_id"],
                                                                e.fields["reason"])


def _explain_ledger(derived_tx: dict[str, list[Event]]) -> Callable[[Event, list[Event]], str]:
    def explain(e: Event, same: list[Event]) -> str:
        if e.name != "LedgerEntryPosted":
            return (f"the ledger's replay does not reject task {e.fields['task_id']} for "
                    f"{e.fields['reason']}")
        tx = e.fields["transaction_id"]
        would = derived_tx.get(tx)
        if not would:
            return (f"the replay of the ledger posts no transaction {tx}; this entry moves "
                    f"{e.fields['amount_micro']:+} to {e.fields['account']}")
        postings = [(w.fields["account"], w.fields["amount_micro"], w.fields["kind"])
                    for w in would]
        return (f"transaction {tx} would post {postings}"
                f", not {e.fields['amount_micro']:+} to {e.fields['account']} "
                f"({e.fields['kind']})")
    return explain


def _role(e: Event, genesis: Genesis | None) -> str:
    """Which service emitted a ``TaskFailed``: its signer, else guessed from its reason."""
    if e.signer in ("allocator", "verifier", "ledger"):
        return e.signer
    if genesis is None and e.producer_id in ("allocator", "verifier", "ledger"):
        return e.producer_id
    reason = e.fields["reason"]
    return ("verifier" if reason in VERIFIER_FAILURES
            else "allocator" if reason in ALLOCATOR_FAILURES else "ledger")


# -- placements ----------------------------------------------------------------------------


@dataclass
class _Node:
    operator_id: str
    tier: Any
    device_class: str
    memory_mb: int
    slots: int
    at_ms: int


def _check_placements(ordered: Sequence[Record], valid: Callable[[Record], bool],
                      role: Callable[[Event], str], config: AuditConfig,
                      verdict_tasks: set[str]) -> list[Discrepancy]:
    out: list[Discrepancy] = []
    submissions: dict[str, Record] = {}
    escrowed: dict[str, int] = {}
    nodes: dict[str, _Node] = {}
    keys: dict[str, bytes] = {}
    reissues: dict[tuple[str, int, int, int], list[tuple[int, frozenset[str]]]] = \
        defaultdict(list)
    committed: dict[tuple[str, str, int], int] = {}
    # Requests and commits are matched by time, not by order within one millisecond.
    for r in ordered:
        f = r.event.fields
        if r.event.name == "ReissueRequested" and valid(r):
            # A whole escalation round (replicas > 0) is asked for as attempt 0 of its
            # replica 0; every replica of it is checked against that one request.
            key = (f["task_id"], f["round"], -1 if f["replicas"] else f["replica_index"],
                   f["attempt"])
            reissues[key].append((r.timestamp, frozenset(f["exclude_node_ids"])))
        elif r.event.name == "ResultCommitted":
            committed.setdefault((f["node_id"], f["task_id"], f["attempt"]), r.timestamp)
    used: dict[str, dict[str, str]] = defaultdict(dict)  # task -> node -> operator
    replicas_seen: set[tuple[str, int, int, int]] = set()
    first_classes: dict[str, set[str]] = defaultdict(set)
    held: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)  # node -> replica -> deadline
    placed: set[str] = set()
    failed: set[str] = set()

    def bad(r: Record, why: str) -> None:
        out.append(Discrepancy("allocator", "constraint", r.event.name, r.event.event_id,
                               r.where, r.event.fields.get("task_id"), why))

    for r in ordered:
        e, f = r.event, r.event.fields
        if not valid(r):
            continue
        if e.name == "TaskSubmitted":
            submissions.setdefault(f["task_id"], r)
        elif e.name == "LedgerEntryPosted":
            if f["kind"] == "escrow" and f["account"] == f"escrow:{f['task_id']}" \
                    and f["amount_micro"] > 0:
                escrowed.setdefault(f["task_id"], r.timestamp)
        elif e.name == "NodeRegistered":
            bound = keys.get(f["node_id"])
            if verify_event(e, f["signing_key"], f["node_id"]) and bound in (None,
                                                                             f["signing_key"]):
                keys[f["node_id"]] = f["signing_key"]
                try:
                    tier = effective_tier(f["tier"], f["tflops_milli"], f["memory_mb"])
                except DestraError:
                    continue
                nodes[f["node_id"]] = _Node(f["operator_id"], tier, f["device_class"],
                                            f["memory_mb"], f["slots"], r.timestamp)
        elif e.name in ("TaskVerified", "TaskFailed"):
            failed.add(f["task_id"])
            if e.name == "TaskFailed" and role(e) == "allocator":
                _check_allocator_failure(r, submissions, placed, bad)
        elif e.name == "TaskAssigned":
            _check_assignment(r, submissions, escrowed, nodes, reissues, used, replicas_seen,
                              first_classes, held, committed, bad)
            placed.add(f["task_id"])
    end = ordered[-1].timestamp if ordered else 0
    for task_id, at in escrowed.items():
        if task_id in placed or task_id in failed or task_id in verdict_tasks:
            continue
        if end - at > config.queue_timeout_ms + config.unplaced_grace_ms:
            sub = submissions.get(task_id)
            out.append(Discrepancy(
                "allocator", "missing", "TaskAssigned", sub.event.event_id if sub else None,
                sub.where if sub else None, task_id,
                f"task {task_id} escrowed at {at} was neither placed nor failed no-capacity "
                f"by the end of the log ({end}), past its queue timeout "
                f"{config.queue_timeout_ms} ms"))
    return out


def _check_allocator_failure(r: Record, submissions: dict[str, Record], placed: set[str],
                             bad: Callable[[Record, str], None]) -> None:
    f = r.event.fields
    task_id, reason = f["task_id"], f["reason"]
    sub = submissions.get(task_id)
    if sub is None:
        bad(r, f"the allocator fails task {task_id}, which was never submitted")
    elif reason == "no-capacity" and task_id in placed:
        bad(r, f"no-capacity for task {task_id}, which the allocator had placed")
    elif reason == "invalid-task":
        s = sub.event.fields
        try:
            workload = get_workload(s["workload"])
            units = workload.compute_units(workload.validate(s["params"]))
        except DestraError:
            return
        if units == s["compute_units"]:
            bad(r, f"invalid-task for task {task_id}, but its workload accepts its parameters "
                   f"and its {units} compute units")


def _check_assignment(r: Record, submissions: dict[str, Record], escrowed: dict[str, int],
                      nodes: dict[str, _Node],
                      reissues: dict[tuple[str, int, int, int],
                                     list[tuple[int, frozenset[str]]]],
                      used: dict[str, dict[str, str]],
                      replicas_seen: set[tuple[str, int, int, int]],
                      first_classes: dict[str, set[str]],
                      held: dict[str, dict[tuple[str, int], int]],
                      committed: dict[tuple[str, str, int], int],
                      bad: Callable[[Record, str], None]) -> None:
    f = r.event.fields
    task_id, node_id, index, attempt = f["task_id"], f["node_id"], f["replica_index"], f["attempt"]
    sub = submissions.get(task_id)
    if sub is None:
        bad(r, f"task {task_id} was never (validly) submitted")
        return
    s = sub.event.fields
    if task_id not in escrowed:
        bad(r, f"task {task_id} has no escrow: nobody pays for this work")
    copied = {"workload": s["workload"], "params": dict(s["params"]),
              "compute_units": s["compute_units"], "payload": s["payload"],
              "payload_ref": s["payload_ref"], "submitter_id": s["submitter_id"],
              "submitter_key": s["signing_key"], "result_key": s["result_key"],
              "task_deadline": sub.event.occurred_at + s["deadline_ms"]}
    differ = [k for k, v in copied.items() if (dict(f[k]) if k == "params" else f[k]) != v]
    if differ:
        bad(r, f"does not carry the submission's terms: {', '.join(differ)} differ")
    if f["reveal_deadline"] < f["commit_deadline"]:
        bad(r, "reveal deadline before the commit deadline")
    node = nodes.get(node_id)
    if node is None or node.at_ms > r.timestamp:
        bad(r, f"node {node_id} is not registered")
        return
    round_ = f["round"]
    adaptive = s["trust"] == "adaptive"
    if not adaptive and (round_ or f["replicas"] not in (0, s["replicas"])):
        bad(r, f"round {round_} of {f['replicas']} replicas for a task of fixed trust")
    # An adaptive task's round sizes are the allocator's plan (round 0, at least the
    # submitter's floor; the verifier replays and checks it) or the verifier's (later).
    limit = f["replicas"] if adaptive and f["replicas"] > 0 else s["replicas"]
    if not 0 <= index < limit:
        bad(r, f"replica index {index} outside the {'round' if adaptive else 'task'}'s "
               f"{limit} replicas")
    if (task_id, round_, index, attempt) in replicas_seen:
        bad(r, f"replica {index} attempt {attempt} of task {task_id} (round {round_}) was "
               "already assigned")
    replicas_seen.add((task_id, round_, index, attempt))
    if attempt > 0 or round_ > 0:
        key = (task_id, round_, index, attempt) if attempt > 0 else (task_id, round_, -1, 0)
        asked = [ex for at, ex in reissues.get(key, ()) if at <= r.timestamp]
        if not asked:
            bad(r, f"attempt {attempt} of replica {index} in round {round_}: the verifier "
                   "asked for no such reissue or round; more replicas than the task's at once")
        elif node_id in asked[0]:
            bad(r, f"node {node_id} is excluded by the reissue request")
    task_nodes = used[task_id]
    if node_id in task_nodes:
        bad(r, f"node {node_id} already ran a replica of task {task_id}")
    elif node.operator_id in task_nodes.values():
        others = sorted(n for n, op in task_nodes.items() if op == node.operator_id)
        bad(r, f"operator {node.operator_id} already runs {others} for task {task_id}: "
               "replicas must be on distinct operators")
    task_nodes[node_id] = node.operator_id
    try:
        wanted = tier_of(s["tier"])
        if node.tier.rank < wanted.rank:
            bad(r, f"node {node_id}'s tier {node.tier} is below the task's {wanted}")
    except DestraError:
        pass
    homogeneous = s["homogeneous"]
    try:
        workload = get_workload(s["workload"])
        params = workload.validate(s["params"])
        memory = workload.memory_mb(params)
        homogeneous = homogeneous or workload.homogeneous(params)  # the workload's rule too
        if node.memory_mb < memory:
            bad(r, f"node {node_id} has {node.memory_mb} MB, the task needs {memory}")
    except DestraError:
        bad(r, f"task {task_id} is invalid for its workload: it should have failed invalid-task")
    if attempt == 0 and homogeneous:
        first_classes[task_id].add(node.device_class)
        if len(first_classes[task_id]) > 1:
            bad(r, f"homogeneous task {task_id} placed on device classes "
                   f"{sorted(first_classes[task_id])}")
    mine = held[node_id]
    for (task, att), deadline in list(mine.items()):
        # Committed (the node computed it) or past its deadline (the verifier replaced it):
        # either way the allocator counts the slot free again.
        if deadline < r.timestamp or committed.get((node_id, task, att), r.timestamp + 1) \
                <= r.timestamp:
            del mine[(task, att)]
    if len(mine) >= node.slots:
        bad(r, f"node {node_id} already holds {len(mine)} uncommitted replicas "
               f"({sorted(mine)}) of its {node.slots} slots")
    mine[(task_id, attempt)] = f["commit_deadline"]


# -- the audit -----------------------------------------------------------------------------


def audit(records: Iterable[Record], genesis: Genesis | None,
          config: AuditConfig | None = None) -> AuditReport:
    """Every discrepancy between the services' outputs on the log and their replay.

    ``genesis`` None trusts every authority event (a log written without signatures).
    """
    config = config or AuditConfig()
    ordered = log_order(records)
    out: list[Discrepancy] = []

    refusals: dict[int, str] = {}
    if genesis is not None:
        for r in ordered:
            refusal = genesis.check(r.event)
            if refusal is not None:
                refusals[id(r)] = refusal
                out.append(Discrepancy("authority", "unauthenticated", r.event.name,
                                       r.event.event_id, r.where,
                                       r.event.fields.get("task_id"), refusal))

    def valid(r: Record) -> bool:
        return id(r) not in refusals

    authentic = [r for r in ordered if valid(r)]

    # The ledger: its decisions on the logged inputs.
    ledger_out = _replay(LedgerDecider("audit", network=config.network,
                                       params=ParamSchedule(config.params)), ordered, valid)
    logged_ledger = [r for r in authentic if r.event.name == "LedgerEntryPosted"
                     or (r.event.name == "TaskFailed" and _role(r.event, genesis) == "ledger")]
    derived_tx: dict[str, list[Event]] = defaultdict(list)
    for emitted in ledger_out:
        if emitted.event.name == "LedgerEntryPosted":
            derived_tx[emitted.event.fields["transaction_id"]].append(emitted.event)
    ledger_found = _compare("ledger", logged_ledger, ledger_out, _ledger_key,
                            _explain_ledger(derived_tx), _describe)

    # The verifier: its verdicts, penalties, reissues and reveal calls on the logged inputs.
    ticks: set[int] = set()
    for r in authentic:
        f = r.event.fields
        if r.event.name == "TaskAssigned":
            ticks |= {f["commit_deadline"] + 1, f["reveal_deadline"] + 1,
                      f["commit_deadline"] + config.reissue_grace_ms + 2}
        elif r.event.name == "TaskSubmitted":
            ticks.add(r.event.occurred_at + f["deadline_ms"] + 1)
        elif r.event.name == "RevealOpened":
            ticks.add(f["reveal_deadline"] + 1)
    verifier = Verifier("audit", max_attempts=config.max_attempts,
                        reissue_grace_ms=config.reissue_grace_ms, rules=config.rules)
    verifier_out = _replay(verifier, ordered, valid, ticks)
    logged_verifier = [r for r in authentic if r.event.name in (
        "TaskVerified", "NodePenalized", "ReissueRequested", "RevealOpened")
        or (r.event.name == "TaskFailed" and _role(r.event, genesis) == "verifier")]
    verifier_found = _compare("verifier", logged_verifier, verifier_out, _verifier_key,
                              _explain_verifier, _describe)
    settled_by = {e.cause.event.event_id for e in ledger_out
                  if e.cause is not None and e.event.name == "LedgerEntryPosted"}
    for i, d in enumerate(verifier_found):
        if d.kind == "unexpected" and d.event_id in settled_by:
            verifier_found[i] = Discrepancy(d.check, d.kind, d.event_type, d.event_id, d.where,
                                            d.task_id, d.reason + "; the ledger moved money "
                                                                  "on it")
    out += verifier_found + ledger_found

    verdict_tasks = {r.event.fields["task_id"] for r in authentic
                     if r.event.name in ("TaskVerified", "TaskFailed")}
    out += _check_placements(ordered, valid, lambda e: _role(e, genesis), config,
                            verdict_tasks)

    counts = Counter(r.event.name for r in ordered)
    checked = {
        "ledger_entries": counts["LedgerEntryPosted"],
        "ledger_entries_rederived": sum(d.event.name == "LedgerEntryPosted" for d in ledger_out),
        "verdicts": counts["TaskVerified"],
        "verdicts_rederived": sum(d.event.name == "TaskVerified" for d in verifier_out),
        "penalties": counts["NodePenalized"],
        "penalties_rederived": sum(d.event.name == "NodePenalized" for d in verifier_out),
        "assignments": counts["TaskAssigned"],
        "authority_events": sum(counts[n] for n in AUTHORITY),
    }
    return AuditReport(len(ordered), out, checked)
