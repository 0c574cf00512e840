"""The allocator's event handling: submissions in, ``TaskAssigned`` out.

Transport-free, behind the processing contract (``streams.processing``): the Kafka
runner (``streams.kafka_runner``, in ``python -m destra.processors``) and the
in-memory runner feed it decoded events and publish what it returns. It

* keeps the node table from signed ``NodeRegistered`` and ``NodeHeartbeat``;
* waits until the ledger has escrowed a submission (the ``escrow:<task>``
  entry), so no node ever works for a task nobody paid for;
* checks the task against its workload (known, parameters in bounds, the
  declared compute matching the workload's estimate) and fails it otherwise,
  which refunds the escrow;
* places the replicas with a ``PlacementPolicy`` (by default the learned one,
  ``allocator.policies.LearnedPolicy``) on distinct operators, counting the
  replicas each node holds so a node is never given more than its slots, and
  queues tasks when the network is full; each ``TaskAssigned`` carries the
  runtime predicted for it;
* learns: the runtimes agreeing nodes report with a verified result train the
  runtime model (in the background), and heartbeat delays refine the latency
  model;
* places a lost replica again when the verifier asks (``ReissueRequested``);
* for a task submitted with ``trust="adaptive"`` (``allocator.trust``): keeps every
  node's reputation from the verifier's verdicts and penalties and the ledger's stake
  entries, places the task on one trusted node (with a random spot check), or on
  several drawn at random while few are trusted, and places the escalation rounds the
  verifier asks for when replicas disagree;
* places a dispute's referee (a ``ReissueRequested`` with ``segment >= 0``, one replica):
  like a round, on a node of an operator the task has not used, trusted ones first
  (``_draw`` with ``rank``), its ``TaskAssigned`` carrying the segment and the
  pre-state the verifier checked. Its runtime (one segment) is not learned from.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from allocator.placement import (
    ConstrainedPolicy,
    NodeTable,
    NodeView,
    PlacementPolicy,
    PlacementRequest,
)
from allocator.policies import LearnedPolicy, node_shape, task_shape
from allocator.runtime_model import NodeShape, Observation, TaskShape, analytic_ms
from allocator.trust import DEFAULT_RULES, Plan, Reputation, TrustRules, follow_parameter
from destra.crypto import verify_event
from destra.errors import DestraError, NoCapacity
from destra.freshness import Freshness
from schemas import Event, new_event
from streams.journal import ExpiringLog
from streams.params import ParamSchedule
from streams.processing import Context, Outcome, Recovery, dispatch
from workloads import get_workload

log = logging.getLogger(__name__)


_TICK = Event("tick", {})
"""Stands for the passing of time where ``dispatch`` wants an event."""

_STAKE = "stake:"
"""The ledger's stake accounts (``ledger.book.stake``)."""


@dataclass(frozen=True)
class Windows:
    """How long a replica has to commit and then to reveal."""

    commit_ms: int = 30_000
    """Floor of the commit window; longer tasks get ``runtime_factor`` x their estimate."""
    reveal_ms: int = 15_000
    runtime_factor: int = 20
    """Commit window = max(commit_ms, factor x the runtime the node's benchmark predicts)."""
    queue_timeout_ms: int = 120_000
    """A task nobody can take for this long fails with ``no-capacity`` (and is refunded)."""


@dataclass
class _Task:
    submission: Event | None
    """None while only the escrow entry has been seen."""
    memory_mb: int
    escrowed: bool = False
    placed: bool = False
    queued_since: int | None = None
    plan: str = ""
    """How an adaptive task's first round was placed (``allocator.trust.Plan.kind``)."""
    homogeneous: bool = False
    """The workload's precision rule for these parameters (``Workload.homogeneous``): one
    device class, whatever the submission's ``homogeneous`` says."""
    checked: bool | None = None
    """Whether its spot check was drawn, once: a task that waits for capacity keeps the
    draw (drawing again at each try would turn checks that find no free checker into
    single placements, and let load decide what is checked)."""


@dataclass
class Allocator:
    """Places escrowed tasks on nodes; every method returns the events to publish."""

    producer_id: str
    policy: PlacementPolicy = field(default_factory=LearnedPolicy)
    windows: Windows = field(default_factory=Windows)
    table: NodeTable = field(default_factory=NodeTable)
    keys: dict[str, bytes] = field(default_factory=dict)
    outstanding: dict[str, dict[tuple[str, int], int]] = field(default_factory=dict)
    """Per node, the (task, attempt) replicas it holds (placed, not yet committed) and
    their commit deadlines: past it the verifier replaces the replica and the slot is free."""
    tasks: dict[str, _Task] = field(default_factory=dict)
    queue: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Escrowed tasks waiting for capacity, oldest first."""
    reissues: list[Event] = field(default_factory=list)
    """Reissue requests waiting for capacity."""
    rejected: list[tuple[Event, Any, str]] = field(default_factory=list)
    """Events refused (bad signature, unknown node), where they came from and why: the
    adapter dead-letters them."""
    freshness: Freshness = field(default_factory=Freshness)
    rules: TrustRules = DEFAULT_RULES
    params: ParamSchedule = field(default_factory=ParamSchedule)
    """The live parameters (``streams.params``); ``rules`` follows their governed ones."""
    reputation: Reputation = field(default_factory=Reputation)
    """Every node's verified history (``allocator.trust``), for adaptive tasks."""
    rounds: dict[str, int] = field(default_factory=dict)
    """Per task in escalation, the last round placed: a round is placed whole, once."""
    _rng: Any = field(default=None, init=False, repr=False)
    """The randomness of the event or tick being handled (``Context.rng``), for placement
    among nodes that rank alike; not state (a restart draws afresh)."""
    """Refuses expired and replayed heartbeats."""
    predictions: dict[tuple[str, str, int], tuple[TaskShape, NodeShape, float]] = field(
        default_factory=dict)
    """Per placed replica (task, node, attempt): what the model saw and predicted."""
    reported: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    """Per (task, node): the attempt and runtime its signed reveal reported."""
    agreed: dict[str, tuple[set[str], int]] = field(default_factory=dict)
    """Verified tasks whose runtimes are still coming: agreeing nodes, verified at."""
    learn_window_ms: int = 120_000
    """How long after its verdict a task's reveals are still learned from."""
    warm: set[tuple[str, str]] = field(default_factory=set)
    """(node, workload) pairs whose first verified runtime since the node (re)started has
    been seen: that first run pays one-time costs (imports, datasets, first kernels), up to
    300 times its later runs in the demo, and is not learned from."""

    # -- the processing contract -------------------------------------------------------------

    name = "allocator"
    inputs = frozenset({"NodeRegistered", "NodeHeartbeat", "TaskSubmitted", "LedgerEntryPosted",
                        "TaskVerified", "TaskFailed", "ReissueRequested", "ResultCommitted",
                        "ResultRevealed", "NodePenalized", "ParameterChanged"})
    recovery = Recovery.SNAPSHOT

    def handle(self, event: Event, ctx: Context) -> Outcome:
        """One input event (``streams.processing``), at processing time: a replica placed
        from a backlog gets its whole commit window from when it is placed."""
        ctx = dataclasses.replace(ctx, now_ms=ctx.processing_ms)
        self._rng = ctx.rng
        return dispatch({
            "NodeRegistered": self.on_registered, "NodeHeartbeat": self.on_heartbeat,
            "TaskSubmitted": self.on_submitted, "LedgerEntryPosted": self.on_entry,
            "TaskVerified": self.on_verified, "TaskFailed": self.on_failed,
            "ReissueRequested": self.on_reissue, "ResultCommitted": self.on_committed,
            "ResultRevealed": self.on_revealed, "NodePenalized": self.on_penalized,
            "ParameterChanged": self.on_parameter},
            self.rejected, event, ctx)

    def on_parameter(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A passed proposal changed a live parameter; the trust rules follow theirs."""
        self.rules = follow_parameter(self.params, self.rules, e, self.rejected, where)
        return []

    def wants(self, event: Event) -> bool:
        """Of the ledger's entries only the escrow of a task (one in about eight per task)
        and what moves a node's stake matter here: the others are not worth a signature
        check."""
        if event.name != "LedgerEntryPosted":
            return True
        f = event.fields
        if f["account"].startswith(_STAKE):
            return True
        return bool(f["kind"] == "escrow" and f["task_id"]
                    and f["account"] == f"escrow:{f['task_id']}" and f["amount_micro"] > 0)

    def tick(self, ctx: Context) -> Outcome:
        """Time passed: deadlines and the queue."""
        self._rng = ctx.rng
        return dispatch({"tick": lambda e, now, where: self.on_tick(now)}, self.rejected,
                        _TICK, ctx)

    _SNAPSHOT_FIELDS = ("table", "keys", "outstanding", "tasks", "queue", "reissues",
                        "reputation", "rounds", "params")
    """Bounded by the nodes and the work in flight; the accepted event ids, which grow with
    the input rate, are an expiring log the runner journals (``journals``)."""

    def journals(self) -> dict[str, ExpiringLog]:
        """The expiring log of accepted event ids (``streams.journal``)."""
        return {"freshness": self.freshness.seen}

    def snapshot(self) -> dict[str, Any]:
        """What placement needs after a restart: nodes, their keys and held slots, the
        tasks waiting or placed, the reissues waiting. The runtime model's learning
        window is not kept (it re-learns from the next verified results)."""
        return {name: getattr(self, name) for name in self._SNAPSHOT_FIELDS}

    def restore(self, state: dict[str, Any]) -> None:
        """Take over a state ``snapshot`` returned."""
        for name in self._SNAPSHOT_FIELDS:
            if name in state:  # reputation, rounds, params: absent from older snapshots
                setattr(self, name, state[name])
        self.rules = self.rules.with_params(self.params.latest())
        if "freshness" in state:  # a snapshot from before the ids were journaled
            self.freshness.take_over(state["freshness"])

    # -- nodes ------------------------------------------------------------------------------

    def on_registered(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A node joined; its registration must be signed by the key it registers."""
        f = e.fields
        if not verify_event(e, f["signing_key"], f["node_id"]):
            self.rejected.append((e, where, f"bad-signature: registration of {f['node_id']} is not "
                                     "signed by the key it registers"))
            return []
        bound = self.keys.get(f["node_id"])
        if bound is not None and bound != f["signing_key"]:
            self.rejected.append((e, where, f"wrong-key: {f['node_id']} is registered with "
                                            "another signing key"))
            return []
        try:
            self.table.on_registered(f["node_id"], f["operator_id"], f["region"], f["tier"],
                                     f["device_class"], f["tflops_milli"], f["memory_mb"],
                                     f["slots"], f["stake_micro"], now_ms)
        except DestraError as err:
            self.rejected.append((e, where, f"invalid-registration: {err}"))
            return []
        self.keys[f["node_id"]] = f["signing_key"]
        self.reputation.on_registered(f["node_id"], now_ms)
        # A (re)started node process is cold again for every workload.
        self.warm = {pair for pair in self.warm if pair[0] != f["node_id"]}
        self.outstanding.setdefault(f["node_id"], {})
        self._sync_slots(f["node_id"])
        return self._drain(now_ms)

    def on_heartbeat(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """Liveness and load; free slots are our own count, which never lags behind."""
        f = e.fields
        key = self.keys.get(f["node_id"])
        if key is None or not verify_event(e, key, f["node_id"]):
            self.rejected.append((e, where,
                                  "bad-signature: heartbeat not signed by a registered node"))
            return []
        refusal = self.freshness.refusal(e, now_ms)
        if refusal is not None:
            self.rejected.append((e, where, refusal))
            return []
        self.freshness.accept(e)
        if isinstance(self.policy, LearnedPolicy):
            # One-way delay from the node's clock to ours, doubled: a round-trip estimate.
            delay = now_ms - e.occurred_at
            self.policy.latency.observe_rtt(f["node_id"], 2 * max(0.0, delay))
        node = self.table.get(f["node_id"])
        assert node is not None
        free = node.slots - len(self.outstanding.get(f["node_id"], ()))
        self.table.on_heartbeat(f["node_id"], f["load_permille"], free, f["seq"], now_ms)
        return self._drain(now_ms) if free > 0 else []

    def _sync_slots(self, node_id: str) -> None:
        node = self.table.get(node_id)
        if node is None:
            return
        held = len(self.outstanding.get(node_id, ()))
        while node.free_slots > max(0, node.slots - held):
            self.table.reserve(node_id)
            node = self.table.get(node_id)
            assert node is not None

    def _release(self, node_id: str, task_id: str, attempt: int, now_ms: int) -> list[Event]:
        held = self.outstanding.get(node_id)
        if held is None or (task_id, attempt) not in held:
            return []
        del held[(task_id, attempt)]
        self.table.release(node_id)
        return self._drain(now_ms)

    def on_committed(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A replica finished computing: its node has a slot again."""
        f = e.fields
        return self._release(f["node_id"], f["task_id"], f["attempt"], now_ms)

    # -- tasks ------------------------------------------------------------------------------

    def on_submitted(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """Remember a submission; place it once the ledger has escrowed its price."""
        task_id = e.fields["task_id"]
        prior = self.tasks.get(task_id)
        if prior is not None and prior.submission is not None:
            return []  # a resubmitted id: the first submission stands
        self.tasks[task_id] = _Task(e, 0, escrowed=prior.escrowed if prior else False)
        return self._try(task_id, now_ms)

    def on_entry(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A ledger entry; the credit to ``escrow:<task>`` means the task is paid for."""
        f = e.fields
        account, task_id = f["account"], f["task_id"]
        if account.startswith(_STAKE):  # a stake locked or slashed
            self.reputation.on_stake(account[len(_STAKE):], f["amount_micro"])
            return []
        if not (task_id and account == f"escrow:{task_id}" and f["kind"] == "escrow"
                and f["amount_micro"] > 0):
            return []
        task = self.tasks.get(task_id)
        if task is None:
            # The entry overtook the submission (another topic): remember it.
            self.tasks[task_id] = _Task(None, 0, escrowed=True)
            return []
        task.escrowed = True
        return self._try(task_id, now_ms)

    def on_failed(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A verdict or rejection: forget the task."""
        task_id = e.fields["task_id"]
        self.tasks.pop(task_id, None)
        self.queue.pop(task_id, None)
        self.rounds.pop(task_id, None)
        self._forget_runtimes(task_id)
        return []

    def on_penalized(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A penalty the verifier decided: the node's reputation records it (the stake it
        takes comes from the ledger's slash entry)."""
        self.reputation.on_penalized(e.fields["node_id"], e.fields["reason"])
        return []

    def on_revealed(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A node's signed reveal: its reported runtime, learned from once the task is
        verified with this node agreeing (the verdict may be read before or after)."""
        f = e.fields
        key = self.keys.get(f["node_id"])
        if key is not None and (f["task_id"], f["node_id"], f["attempt"]) in self.predictions \
                and verify_event(e, key, f["node_id"]):
            self.reported[(f["task_id"], f["node_id"])] = (f["attempt"], f["runtime_ms"])
            self._learn(f["task_id"], f["node_id"])
        return []

    def on_verified(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """A verified result: the agreeing nodes' runtimes train the model."""
        task_id = e.fields["task_id"]
        self.tasks.pop(task_id, None)
        self.queue.pop(task_id, None)
        self.rounds.pop(task_id, None)
        self.reputation.on_verdict(e.fields["contributions"])
        self.agreed[task_id] = ({c["node_id"] for c in e.fields["contributions"]
                                 if c["agreed"]}, now_ms)
        for c in e.fields["contributions"]:
            self._learn(task_id, c["node_id"])
        return []

    def _learn(self, task_id: str, node_id: str) -> None:
        """Feed the model one verified runtime, once both the verdict and reveal are in."""
        agreed = self.agreed.get(task_id)
        if agreed is None or node_id not in agreed[0]:
            return
        reported = self.reported.pop((task_id, node_id), None)
        if reported is None:
            return
        placed = self.predictions.pop((task_id, node_id, reported[0]), None)
        model = getattr(self.policy, "model", None)
        if placed is not None and model is not None:
            task, node, predicted = placed
            if (node_id, task.workload) not in self.warm:
                self.warm.add((node_id, task.workload))  # a cold start: see ``warm``
                return
            model.observe(Observation(task, node, float(reported[1]), predicted))

    def _forget_runtimes(self, task_id: str) -> None:
        self.agreed.pop(task_id, None)
        for placed in [k for k in self.predictions if k[0] == task_id]:
            del self.predictions[placed]
        for reported in [k for k in self.reported if k[0] == task_id]:
            del self.reported[reported]

    def on_reissue(self, e: Event, now_ms: int, where: Any = None) -> list[Event]:
        """The verifier lost a replica (place it on a node the task has not used), or its
        replicas disagreed (place the next round whole)."""
        return self._place_reissue(e, now_ms) or []

    def on_tick(self, now_ms: int) -> list[Event]:
        """Time passed: free the slots of missed commits, retry queued work, fail the stale."""
        out: list[Event] = []
        self.freshness.prune(now_ms)
        for task_id in [t for t, (_, at) in self.agreed.items()
                        if now_ms - at > self.learn_window_ms]:
            self._forget_runtimes(task_id)
        for node_id, held in self.outstanding.items():
            for (task_id, attempt), deadline in list(held.items()):
                if now_ms > deadline:
                    del held[(task_id, attempt)]
                    self.table.release(node_id)
        for task_id in list(self.queue):
            task = self.tasks.get(task_id)
            if task is None or task.queued_since is None:
                self.queue.pop(task_id, None)
            elif now_ms - task.queued_since > self.windows.queue_timeout_ms:
                self.queue.pop(task_id, None)
                self.tasks.pop(task_id, None)
                out.append(new_event("TaskFailed", self.producer_id, task_id=task_id,
                                     reason="no-capacity",
                                     detail=f"no nodes could take it for "
                                            f"{self.windows.queue_timeout_ms} ms"))
        return out + self._drain(now_ms)

    # -- placement --------------------------------------------------------------------------

    def _try(self, task_id: str, now_ms: int) -> list[Event]:
        task = self.tasks[task_id]
        if task.submission is None or not task.escrowed or task.placed:
            return []
        f = task.submission.fields
        try:
            workload = get_workload(f["workload"])
            params = workload.validate(f["params"])
            units = workload.compute_units(params)
            if units != f["compute_units"]:
                raise DestraError(f"declared compute {f['compute_units']} units, the workload "
                                  f"needs {units} for these parameters")
            task.memory_mb = workload.memory_mb(params)
            # The precision rule is the workload's, not the submitter's to waive: a task
            # spread over device classes that cannot agree would frame honest nodes.
            task.homogeneous = workload.homogeneous(params)
        except DestraError as err:
            self.tasks.pop(task_id, None)
            return [new_event("TaskFailed", self.producer_id, task_id=task_id,
                              reason="invalid-task", detail=str(err)[:2000])]
        task.queued_since = now_ms if task.queued_since is None else task.queued_since
        self.queue[task_id] = None
        return self._drain(now_ms)

    def _drain(self, now_ms: int) -> list[Event]:
        """Place what waits, reissues first (their tasks are furthest along), then by age."""
        out: list[Event] = []
        waiting, self.reissues = self.reissues, []
        for request in waiting:
            placed = self._place_reissue(request, now_ms)
            if placed is not None:  # else _place_reissue queued it again (once)
                out += placed
        free_operators = self._free_operators(now_ms)
        for task_id in list(self.queue):
            if free_operators == 0:
                break  # the network is full: nothing further can be placed
            task = self.tasks.get(task_id)
            if task is not None and task.submission is not None and (
                    task.submission.fields["replicas"] > free_operators):
                continue  # cannot fit now: skip the placement attempt, it would fail
            placed = self._place_new(task_id, now_ms)
            if placed:  # else it waits; younger tasks may fit elsewhere
                out += placed
                free_operators = self._free_operators(now_ms)
        return out

    def _free_operators(self, now_ms: int) -> int:
        """How many operators have a live node with a free slot: an upper bound on the
        replicas any placement can find now (one replica per operator)."""
        return len({n.operator_id for n in self.table
                    if n.free_slots > 0 and self.table.is_live(n, now_ms)})

    @staticmethod
    def _submission(task: _Task) -> Event:
        assert task.submission is not None, "only tasks whose submission was seen are placed"
        return task.submission

    def _request(self, task: _Task, replicas: int, exclude: frozenset[str]) -> PlacementRequest:
        f = self._submission(task).fields
        return PlacementRequest(
            f["task_id"], replicas, task.memory_mb, f["tier"], f["region"],
            f["homogeneous"] or getattr(task, "homogeneous", False),
            exclude, workload=f["workload"], compute_units=f["compute_units"],
            # No price limit per node: a task pays its quoted tier price whichever node
            # runs it (the ledger enforces the max price), and better tiers may serve.
            payload_bytes=len(f["payload"] or b""), rng=self._rng)

    def _place_new(self, task_id: str, now_ms: int) -> list[Event] | None:
        task = self.tasks.get(task_id)
        if task is None:
            self.queue.pop(task_id, None)
            return []
        f = self._submission(task).fields
        try:
            if f["trust"] == "adaptive":
                plan = self._plan(task, now_ms)
                nodes = [self._node(n) for n in plan.nodes]
                size, quorum = len(nodes), plan.quorum
                task.plan = plan.kind
            else:
                nodes = self.policy.place(self._request(task, f["replicas"], frozenset()),
                                          self.table, now_ms)
                size = quorum = 0  # the submission's
        except NoCapacity:
            return None
        self.queue.pop(task_id, None)
        task.placed = True
        return [self._assign(task, node.node_id, index, 0, now_ms, replicas=size, quorum=quorum)
                for index, node in enumerate(nodes)]

    # -- adaptive trust (``allocator.trust``) ------------------------------------------------

    def _random(self) -> Any:
        """The handler's randomness; the operating system's when called outside a handler."""
        return self._rng if self._rng is not None else random.SystemRandom()

    def _node(self, node_id: str) -> NodeView:
        node = self.table.get(node_id)
        assert node is not None, "placement returns registered nodes"
        return node

    def _eligible(self, trusted: bool, stake_micro: int = 0) -> frozenset[str]:
        """Nodes with enough stake to run an adaptive task; with ``trusted``, only those
        that have earned single-replica placement and hold at least ``stake_micro``."""
        test = self.rules.trusted if trusted else self.rules.eligible
        return frozenset(n for n, r in self.reputation.records.items()
                         if test(r) and r.stake_micro >= stake_micro)

    def _draw(self, request: PlacementRequest, count: int, now_ms: int,
              rank: bool = False) -> list[NodeView]:
        """``count`` nodes of distinct operators drawn uniformly among the request's
        candidates (with ``rank``: the best by ``TrustRules.escalation_rank`` first, drawn
        uniformly among equals), so that nobody can arrange to be placed with a
        colluder. ``NoCapacity`` when fewer fit."""
        if not isinstance(self.policy, ConstrainedPolicy):
            raise NoCapacity("adaptive trust needs a policy that keeps the hard constraints")
        candidates, _ = self.policy.candidates(request, self.table, now_ms)
        excluded = {n.operator_id for n in map(self.table.get, request.exclude_node_ids)
                    if n is not None}
        rng = self._random()
        draw = {n.node_id: rng.random() for n in candidates}
        if rank:
            candidates.sort(key=lambda n: (
                self.rules.escalation_rank(self.reputation.get(n.node_id)), draw[n.node_id]))
        else:
            candidates.sort(key=lambda n: draw[n.node_id])
        chosen: list[NodeView] = []
        for node in candidates:
            if node.operator_id not in excluded:
                chosen.append(node)
                excluded.add(node.operator_id)
                if len(chosen) == count:
                    return chosen
        raise NoCapacity(f"task {request.task_id}: {count} replicas of distinct operators "
                         f"needed, {len(chosen)} eligible")

    def _plan(self, task: _Task, now_ms: int) -> Plan:
        """The first round of an adaptive task: one trusted node, chosen by the placement
        policy, plus a checker drawn at random with the node's spot-check rate; or, while
        no trusted node is free, ``bootstrap_replicas`` eligible nodes drawn at random. The
        submitter's replicas and quorum are floors."""
        f = self._submission(task).fields
        floor, floor_quorum = f["replicas"], f["quorum"]
        base = self._request(task, 1, frozenset())
        try:
            # Alone only on a node whose stake covers the slash a wrong result would cost.
            slash = self.rules.dissent_slash_micro(f["quoted_price_micro"],
                                                   self.rules.min_stake_micro)
            (primary,) = self.policy.place(
                dataclasses.replace(base, only_node_ids=self._eligible(True, slash)),
                self.table, now_ms)
        except NoCapacity:
            count = max(floor, self.rules.bootstrap_replicas)
            nodes = self._draw(dataclasses.replace(base, only_node_ids=self._eligible(False)),
                               count, now_ms)
            return Plan(tuple(n.node_id for n in nodes), max(floor_quorum, count // 2 + 1),
                        "bootstrap")
        extra, kind = floor - 1, "floor"
        record = self.reputation.get(primary.node_id)
        assert record is not None
        if extra == 0:
            if task.checked is None:
                task.checked = self._random().random() * 1000 < self.rules.spot_permille(
                    record)
            extra, kind = (1, "spot-check") if task.checked else (0, "single")
        others = self._draw(dataclasses.replace(
            base, only_node_ids=self._eligible(trusted=False),
            exclude_node_ids=frozenset({primary.node_id})), extra, now_ms) if extra else []
        count = 1 + len(others)
        return Plan((primary.node_id, *(n.node_id for n in others)),
                    max(floor_quorum, count // 2 + 1), kind)

    def _place_round(self, e: Event, now_ms: int) -> list[Event] | None:
        """An escalation round, placed whole: ``replicas`` eligible nodes of operators the
        task has not used, trusted ones first, drawn at random among equals. A dispute's
        referee (``segment >= 0``) is such a round of one."""
        f = e.fields
        task = self.tasks.get(f["task_id"])
        if task is None or task.submission is None or self.rounds.get(f["task_id"], 0) >= \
                f["round"]:
            return []  # the task ended meanwhile, or this round is placed already
        request = dataclasses.replace(
            self._request(task, 1, frozenset(f["exclude_node_ids"])),
            only_node_ids=self._eligible(trusted=False))
        try:
            nodes = self._draw(request, f["replicas"], now_ms, rank=True)
        except NoCapacity:
            if e not in self.reissues:
                self.reissues.append(e)
            return None
        self.rounds[f["task_id"]] = f["round"]
        return [self._assign(task, node.node_id, index, 0, now_ms, round_=f["round"],
                             replicas=f["replicas"], quorum=f["quorum"],
                             segment=f.get("segment", -1), pre_state=f.get("pre_state"))
                for index, node in enumerate(nodes)]

    def _place_reissue(self, e: Event, now_ms: int) -> list[Event] | None:
        f = e.fields
        if f["replicas"] > 0:
            return self._place_round(e, now_ms)
        task = self.tasks.get(f["task_id"])
        if task is None or task.submission is None:
            return []  # the task ended meanwhile
        request = self._request(task, 1, frozenset(f["exclude_node_ids"]))
        if task.submission.fields["trust"] == "adaptive":
            # A lost replica of a task a trusted node ran alone goes to a trusted node.
            request = dataclasses.replace(request, only_node_ids=self._eligible(
                trusted=task.plan == "single" and f["round"] == 0))
        try:
            (node,) = self.policy.place(request, self.table, now_ms)
        except NoCapacity:
            if e not in self.reissues:
                self.reissues.append(e)
            return None
        return [self._assign(task, node.node_id, f["replica_index"], f["attempt"], now_ms,
                             round_=f["round"], segment=f.get("segment", -1),
                             pre_state=f.get("pre_state"))]

    def _assign(self, task: _Task, node_id: str, index: int, attempt: int, now_ms: int, *,
                round_: int = 0, replicas: int = 0, quorum: int = 0, segment: int = -1,
                pre_state: bytes | None = None) -> Event:
        submission = self._submission(task)
        f = submission.fields
        node = self.table.get(node_id)
        assert node is not None
        request = self._request(task, 1, frozenset())
        analytic = analytic_ms(task_shape(request), node_shape(node))
        predicted = getattr(self.policy, "last_runtime", {}).get(node_id, analytic)
        if segment < 0:  # a referee runs one segment: nothing for the model to learn
            self.predictions[(f["task_id"], node_id, attempt)] = (
                task_shape(request), node_shape(node), predicted)
        # The commit window follows the slower of the two estimates: a model that
        # underestimates must not make an honest node miss its deadline.
        commit = now_ms + max(self.windows.commit_ms,
                              int(self.windows.runtime_factor * max(analytic, predicted)))
        self.table.reserve(node_id)
        self.outstanding.setdefault(node_id, {})[(f["task_id"], attempt)] = commit
        return new_event(
            "TaskAssigned", self.producer_id, task_id=f["task_id"], node_id=node_id,
            replica_index=index, attempt=attempt, commit_deadline=commit,
            reveal_deadline=commit + self.windows.reveal_ms, workload=f["workload"],
            params=dict(f["params"]), compute_units=f["compute_units"],
            predicted_runtime_ms=max(1, round(predicted)),
            task_deadline=submission.occurred_at + f["deadline_ms"],
            payload=f["payload"], payload_ref=f["payload_ref"],
            submitter_id=f["submitter_id"], submitter_key=f["signing_key"],
            result_key=f["result_key"], data_key_commitment=f["data_key_commitment"],
            round=round_, replicas=replicas, quorum=quorum, segment=segment,
            pre_state=pre_state)

