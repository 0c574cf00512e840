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
* places a lost replica again when the verifier asks (``ReissueRequested``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from allocator.placement import NodeTable, PlacementPolicy, PlacementRequest
from allocator.policies import LearnedPolicy, node_shape, task_shape
from allocator.runtime_model import NodeShape, Observation, TaskShape, analytic_ms
from destra.crypto import verify_event
from destra.errors import DestraError, NoCapacity
from destra.freshness import Freshness
from schemas import Event, new_event
from streams.journal import ExpiringLog
from streams.processing import Context, Outcome, Recovery, dispatch
from workloads import get_workload

log = logging.getLogger(__name__)


_TICK = Event("tick", {})
"""Stands for the passing of time where ``dispatch`` wants an event."""


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
                        "ResultRevealed"})
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
            "ResultRevealed": self.on_revealed}, self.rejected, event, ctx)

    def wants(self, event: Event) -> bool:
        """Of the ledger's entries only the escrow of a task matters here (one in about
        eight per task): the others are not worth a signature check."""
        if event.name != "LedgerEntryPosted":
            return True
        f = event.fields
        return bool(f["kind"] == "escrow" and f["task_id"]
                    and f["account"] == f"escrow:{f['task_id']}" and f["amount_micro"] > 0)

    def tick(self, ctx: Context) -> Outcome:
        """Time passed: deadlines and the queue."""
        self._rng = ctx.rng
        return dispatch({"tick": lambda e, now, where: self.on_tick(now)}, self.rejected,
                        _TICK, ctx)

    _SNAPSHOT_FIELDS = ("table", "keys", "outstanding", "tasks", "queue", "reissues")
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
            setattr(self, name, state[name])
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
        self._forget_runtimes(task_id)
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
        """The verifier lost a replica: place it on a node the task has not used."""
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
            f["task_id"], replicas, task.memory_mb, f["tier"], f["region"], f["homogeneous"],
            exclude, workload=f["workload"], compute_units=f["compute_units"],
            # No price limit per node: a task pays its quoted tier price whichever node
            # runs it (the ledger enforces the max price), and better tiers may serve.
            payload_bytes=len(f["payload"] or b""), rng=self._rng)

    def _place_new(self, task_id: str, now_ms: int) -> list[Event] | None:
        task = self.tasks.get(task_id)
        if task is None:
            self.queue.pop(task_id, None)
            return []
        replicas = self._submission(task).fields["replicas"]
        try:
            nodes = self.policy.place(self._request(task, replicas, frozenset()), self.table,
                                      now_ms)
        except NoCapacity:
            return None
        self.queue.pop(task_id, None)
        task.placed = True
        return [self._assign(task, node.node_id, index, 0, now_ms)
                for index, node in enumerate(nodes)]

    def _place_reissue(self, e: Event, now_ms: int) -> list[Event] | None:
        f = e.fields
        task = self.tasks.get(f["task_id"])
        if task is None or task.submission is None:
            return []  # the task ended meanwhile
        try:
            (node,) = self.policy.place(
                self._request(task, 1, frozenset(f["exclude_node_ids"])), self.table, now_ms)
        except NoCapacity:
            if e not in self.reissues:
                self.reissues.append(e)
            return None
        return [self._assign(task, node.node_id, f["replica_index"], f["attempt"], now_ms)]

    def _assign(self, task: _Task, node_id: str, index: int, attempt: int,
                now_ms: int) -> Event:
        submission = self._submission(task)
        f = submission.fields
        node = self.table.get(node_id)
        assert node is not None
        request = self._request(task, 1, frozenset())
        analytic = analytic_ms(task_shape(request), node_shape(node))
        predicted = getattr(self.policy, "last_runtime", {}).get(node_id, analytic)
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
            result_key=f["result_key"], data_key_commitment=f["data_key_commitment"])

