"""A whole network on the in-memory runner: ledger, allocator, verifier, nodes, a submitter.

The processors are the production ones; only the transport is in memory and the
clock virtual (``streams.memory``). Workloads really run (small ones), with real
signatures and real encryption of private parameters. The deadline scenarios in
``tests/unit/test_scenarios.py`` and ``bench/restart.py`` build on it.

The keys here are derived from names, for repeatable runs: never use them for real.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from allocator.policies import LeastLoadedPolicy
from allocator.pricing import PriceBook, PriceUpdate
from allocator.service import Allocator, Windows
from allocator.trust import DEFAULT_RULES, TrustRules
from destra.confidential import grant, merge_params, open_input, seal_input, seal_result
from destra.crypto import KeyPair, sign_event, verify_event
from destra.errors import DecryptionFailed, InvalidParams
from ledger.decider import LedgerDecider
from node_runner.logic import Computed, Fault, NodeLogic, refused, run_assignment
from schemas import Event, new_event
from schemas.bindings import data_key_commitment, sign_stake_consent
from streams.memory import MemoryRunner
from streams.processing import Context, Outcome, Recovery
from verifier.service import Verifier
from workloads import get_workload
from workloads.base import WorkRefused

CPU = torch.device("cpu")
HEARTBEAT_MS = 2_000


def keys_for(name: str) -> KeyPair:
    """Deterministic keys for a simulated account or node (never use such keys for real)."""
    return KeyPair(hashlib.sha256(f"{name} signing".encode()).digest(),
                   hashlib.sha256(f"{name} x25519".encode()).digest())


class Compute:
    """What ``NodeRunner`` computes, sealed inputs travelling inline; with ``reuse``, a
    workload runs once per distinct input and its output is handed back for the same
    input again (for long simulations: say so where figures are printed). ``faults``: the
    nodes whose computation misbehaves (``run_assignment``'s faults, as ``NodeRunner``
    passes its own), never reused."""

    def __init__(self, reuse: bool = False, faults: Mapping[str, Fault] | None = None) -> None:
        self.reuse, self.runs, self.reused, self.segment_runs = reuse, 0, 0, 0
        self.faults = dict(faults or {})
        self._done: dict[tuple[str, str], Computed] = {}

    def __call__(self, assignment: Event, data_key: bytes | None) -> Computed:
        f = assignment.fields
        workload = get_workload(f["workload"])
        try:
            params = dict(f["params"])
            if data_key is not None:
                params = merge_params(params, open_input(data_key, f["task_id"], f["payload"]))
            parsed = workload.validate(params)
        except (DecryptionFailed, InvalidParams) as err:
            return refused(WorkRefused("invalid-input", str(err)))
        fault = self.faults.get(f["node_id"], Fault.NONE)
        if f.get("segment", -1) >= 0:  # a referee: one segment, never reused
            self.segment_runs += 1
            return run_assignment(assignment, workload, parsed, CPU, fault)
        if fault != Fault.NONE:
            self.runs += 1
            return run_assignment(assignment, workload, parsed, CPU, fault)
        key = (f["workload"], repr(sorted(parsed.items())))
        if self.reuse and key in self._done:
            self.reused += 1
            return self._done[key]
        self.runs += 1
        self._done[key] = run_assignment(assignment, workload, parsed, CPU)
        return self._done[key]


def node(name: str, compute: Callable[[Event, bytes | None], Computed] | None = None,
         fault: Fault = Fault.NONE, slots: int = 1) -> NodeLogic:
    """A node's task logic with deterministic keys; results sealed inline."""
    keys = keys_for(name)

    def seal(a: Event, output: bytes) -> tuple[bytes | None, str | None]:
        f = a.fields
        return seal_result(f["result_key"], f["task_id"], name, f["attempt"], output), None

    return NodeLogic(name, (keys,), compute or Compute(), seal, slots=slots, fault=fault,
                     producer_id=name)


def registration(n: NodeLogic, stake: int = 0, operator: str | None = None,
                 consent_by: KeyPair | None = None, device_class: str = "cpu") -> Event:
    """The node's signed ``NodeRegistered``; a stake carries the operator's consent, signed
    with ``consent_by`` (the operator's ``keys_for`` keys unless given)."""
    operator = operator or f"op-{n.node_id}"
    consent = b"" if stake == 0 else sign_stake_consent(
        consent_by or keys_for(operator), "", operator, n.node_id, n.keys.signing_public, stake)
    return sign_event(new_event(
        "NodeRegistered", n.node_id, node_id=n.node_id, operator_id=operator,
        region="eu-west", signing_key=n.keys.signing_public,
        encryption_key=n.keys.encryption_public, device_name="simulated cpu",
        device_class=device_class, tier="consumer", tflops_milli=100, memory_mb=4096, slots=n.slots,
        stake_micro=stake, software="simulation", operator_consent=consent), n.keys, n.node_id)


def account_registration(name: str, at: int | None = None) -> Event:
    """A simulated account's signed ``AccountRegistered`` (its ``keys_for`` keys)."""
    keys = keys_for(name)
    return sign_event(new_event("AccountRegistered", name, occurred_at=at, account_id=name,
                                signing_key=keys.signing_public,
                                encryption_key=keys.encryption_public), keys, name)


class Heartbeats:
    """Every node's signed heartbeat every ``every_ms`` (``HEARTBEAT_MS``) of virtual time
    (the node runner's thread in production)."""

    name = "heartbeats"
    inputs: frozenset[str] = frozenset()
    recovery = Recovery.NONE

    def __init__(self, nodes: list[NodeLogic], start_ms: int,
                 every_ms: int = HEARTBEAT_MS) -> None:
        self.nodes, self.next_ms, self.seq = nodes, start_ms, 0
        self.every_ms = every_ms
        self.stopped: set[str] = set()

    def handle(self, event: Event, ctx: Context) -> Outcome:
        return Outcome()

    def tick(self, ctx: Context) -> Outcome:
        if ctx.now_ms < self.next_ms:
            return Outcome()
        self.next_ms = ctx.now_ms + self.every_ms
        self.seq += 1
        out = []
        for n in self.nodes:
            if n.node_id in self.stopped:
                continue
            load, free = n.heartbeat_load()
            out.append(sign_event(new_event(
                "NodeHeartbeat", n.node_id, occurred_at=ctx.now_ms, node_id=n.node_id,
                load_permille=load, free_slots=free, seq=self.seq), n.keys, n.node_id))
        return Outcome.of(out)


class Submitter:
    """An account: signs submissions with sealed private parameters and grants the data
    key to each node assigned one of its tasks (``Client.watch`` and ``grant-agent``);
    forgets a task at its verdict."""

    name = "submitter"
    inputs = frozenset({"NodeRegistered", "TaskAssigned", "TaskVerified", "TaskFailed",
                        "PriceUpdated"})
    recovery = Recovery.NONE

    def __init__(self, account: str = "alice", grants: bool = True,
                 frame: tuple[str, ...] = ()) -> None:
        self.account, self.keys, self.grants = account, keys_for(account), grants
        self.frame = frame
        """Nodes this submitter tries to frame: it grants them a key other than the one its
        submission commits to."""
        self.data_keys: dict[str, bytes] = {}
        self.node_keys: dict[str, bytes] = {}
        self.granted: set[tuple[str, str, int]] = set()
        self.prices = PriceBook()
        """The network's prices, following ``PriceUpdated`` (a market, when one runs)."""

    def submission(self, task_id: str, workload: str, params: dict[str, str], now_ms: int,
                   replicas: int = 3, quorum: int = 2, deadline_ms: int = 600_000,
                   units_delta: int = 0, trust: str = "fixed",
                   homogeneous: bool | None = None) -> Event:
        """A signed ``TaskSubmitted`` at the network's price; ``units_delta`` misdeclares
        its compute (the allocator then fails it); ``homogeneous`` overrides the workload's
        precision rule (``Workload.homogeneous``) in the submission."""
        w = get_workload(workload)
        public, private = w.split(params)
        parsed = w.validate(public)  # as the ledger and the allocator: the sealed part
        units = w.compute_units(parsed) + units_delta  # is only the nodes' to check
        q = self.prices.quote(workload, units, replicas, "consumer", now_ms, 60_000, trust)
        payload = None
        commitment = b""
        if private:
            self.data_keys[task_id], payload = seal_input(task_id, private)
            commitment = data_key_commitment(task_id, self.data_keys[task_id])
        return sign_event(new_event(
            "TaskSubmitted", self.account, occurred_at=now_ms, task_id=task_id,
            submitter_id=self.account, workload=workload, params=public, replicas=replicas,
            quorum=quorum, compute_units=units, max_price_micro=q.price_micro,
            quote_id=q.quote_id, quoted_price_micro=q.price_micro,
            quote_expires_at=q.expires_at, tier="consumer", region=None,
            homogeneous=w.homogeneous(parsed) if homogeneous is None else homogeneous,
            deadline_ms=deadline_ms,
            result_key=self.keys.encryption_public, payload_ref=None, payload=payload,
            signing_key=self.keys.signing_public, data_key_commitment=commitment,
            trust=trust),
            self.keys, self.account)

    def handle(self, event: Event, ctx: Context) -> Outcome:
        f = event.fields
        if event.name == "PriceUpdated":
            self.prices.apply(PriceUpdate(f["tier"], f["price_per_unit_micro"],
                                          f["effective_at"]))
            return Outcome()
        if event.name == "NodeRegistered":
            if verify_event(event, f["signing_key"], f["node_id"]):
                self.node_keys.setdefault(f["node_id"], f["encryption_key"])
            return Outcome()
        if event.name in ("TaskVerified", "TaskFailed"):
            if self.data_keys.pop(f["task_id"], None) is not None:
                self.granted = {r for r in self.granted if r[0] != f["task_id"]}
            return Outcome()
        replica = (f["task_id"], f["node_id"], f["attempt"])
        data_key = self.data_keys.get(f["task_id"])
        if not self.grants or data_key is None or replica in self.granted:
            return Outcome()
        self.granted.add(replica)
        if f["node_id"] in self.frame:
            data_key = hashlib.sha256(b"not the data key" + data_key).digest()
        return Outcome.of([sign_event(grant(self.account, f["task_id"], f["node_id"],
                                            f["attempt"], data_key, self.node_keys[f["node_id"]])
                                      .with_envelope(occurred_at=ctx.now_ms),
                                      self.keys, self.account)])

    def tick(self, ctx: Context) -> Outcome:
        return Outcome()


class OnVirtualClock:
    """A service run on the virtual clock: the penalties it emits unsigned are stamped with
    the time it decided them (``Context.now_ms``), as a live service's wall clock stamps
    them near the broker's. The verifier stamps its events with the wall clock, which here
    is far from the virtual one: the ledger would refuse its penalties as stale."""

    STAMPED = frozenset({"NodePenalized"})
    """What the ledger judges by age (its other outputs are left as they are)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name, self.inputs, self.recovery = inner.name, inner.inputs, inner.recovery

    @staticmethod
    def _stamped(out: Outcome, ctx: Context) -> Outcome:
        out.emit = [e.with_envelope(occurred_at=ctx.now_ms)
                    if e.signature is None and e.name in OnVirtualClock.STAMPED else e
                    for e in out.emit]
        return out

    def handle(self, event: Event, ctx: Context) -> Outcome:
        return self._stamped(self.inner.handle(event, ctx), ctx)

    def tick(self, ctx: Context) -> Outcome:
        return self._stamped(self.inner.tick(ctx), ctx)

    def finished(self, key: Any, result: Any, ctx: Context) -> Outcome:
        return self._stamped(self.inner.finished(key, result, ctx), ctx)


class Sim:
    """A small network: ``sim.runner`` drives it; helpers read the outcome."""

    def __init__(self, faults: dict[str, Fault] | None = None, nodes: int = 4,
                 grants: bool = True, commit_ms: int = 30_000, reveal_ms: int = 15_000,
                 reissue_grace_ms: int = 60_000, stake: int = 5_000_000,
                 frame: tuple[str, ...] = (), rules: TrustRules = DEFAULT_RULES,
                 compute: Callable[[Event, bytes | None], Computed] | None = None,
                 device_classes: dict[str, str] | None = None) -> None:
        faults = faults or {}
        compute = compute or Compute(faults=faults)
        self.nodes = [node(f"n{i}", compute, faults.get(f"n{i}", Fault.NONE))
                      for i in range(nodes)]
        self.ledger = LedgerDecider("ledger")
        self.allocator = Allocator("allocator", policy=LeastLoadedPolicy(),
                                   windows=Windows(commit_ms=commit_ms, reveal_ms=reveal_ms),
                                   rules=rules)
        self.verifier = Verifier("verifier", reissue_grace_ms=reissue_grace_ms, rules=rules)
        self.alice = Submitter("alice", grants=grants, frame=frame)
        self.runner = MemoryRunner([self.ledger, self.allocator, OnVirtualClock(self.verifier),
                                    self.alice, *self.nodes])
        for n in self.nodes:  # the copier reads the reveals already on the log
            n.copy_digest = self._copied_digest(n.node_id)
        self.heart = Heartbeats(self.nodes, self.runner.now_ms)
        self.runner.processors = [*self.runner.processors, self.heart]
        t = self.runner.now_ms
        for account in ("alice", *(f"op-{n.node_id}" for n in self.nodes)):
            self.runner.publish(account_registration(account, t))
        self.runner.publish(new_event("TokensMinted", "treasury", occurred_at=t,
                                      account="alice", amount_micro=10**12, reason="sim"))
        for n in self.nodes:
            self.runner.publish(new_event("TokensMinted", "treasury", occurred_at=t,
                                          account=f"op-{n.node_id}", amount_micro=stake,
                                          reason="sim"))
            self.runner.publish(registration(
                n, stake=stake, device_class=(device_classes or {}).get(n.node_id, "cpu")))
        self.runner.advance(HEARTBEAT_MS)

    def _copied_digest(self, node_id: str) -> Callable[[str], bytes | None]:
        def copy(task_id: str) -> bytes | None:
            for e in self.runner.events("ResultRevealed"):
                if e.fields["task_id"] == task_id and e.fields["node_id"] != node_id:
                    digest: bytes = e.fields["digest"]
                    return digest
            return None
        return copy

    def submit(self, task_id: str, workload: str = "heat2d",
               params: dict[str, str] | None = None, **terms: Any) -> None:
        """Alice submits a task now."""
        self.runner.publish(self.alice.submission(
            task_id, workload, params or {"grid": "8", "steps": "1"}, self.runner.now_ms,
            **terms), source="alice")

    def verdict(self, task_id: str) -> Event | None:
        """The task's ``TaskVerified`` or ``TaskFailed``, if any yet."""
        for e in self.runner.events("TaskVerified", "TaskFailed"):
            if e.fields["task_id"] == task_id:
                return e
        return None

    def balance(self, account: str) -> int:
        """An account's balance in the simulated ledger."""
        return self.ledger.book.balance(account)
