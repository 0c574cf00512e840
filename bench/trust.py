"""Adversaries against the network's trust policies (issue 12, item 5).

    python bench/trust.py [--nodes 1000] [--tasks 5000] [--quick] [--seed 1]
                          [--networks fixed-3/2,adaptive] [--strategies honest,collude-10,...]
                          [--out PATH]

A fleet of ``--nodes`` identities, each its own operator, runs ``--tasks`` tasks
(heat2d 8x8, 1 step, plain inputs) through the production handlers: the ledger
decider, the allocator, the verifier and every node's task logic, on the
in-memory runner (``streams.memory``) and its virtual clock, as ``destra.sim``
builds them. Only the transport is simulated, and three shortcuts are taken for speed:
the nodes' task logic is reached through one router (``Fleet``) that hands each
event to the node it names (production's per-node inboxes); the workload runs once
and its output is reused for every replica (``destra.sim.Compute(reuse=True)``);
heartbeats come every 10 virtual s (the node table's liveness limit is 30 s).

Rows are the network's policy (``NETWORK_POLICIES``): "fixed 3 replicas, majority
2", placed uniformly at random among live nodes of distinct operators
(``RandomPolicy``, the constraints every policy keeps); ``fixed-3/2-learned`` is the
same with the production default placement (``LearnedPolicy``), which draws with the
handler's randomness among nodes whose expected times are within 10 % (plus 20 ms) of
the best: on this fleet of identical idle nodes that is every node, so it places like
random. ``adaptive`` is adaptive replication (``allocator.trust``: reputation, one
trusted replica, spot checks, escalation rounds) with the network's default rules, its
trusted node chosen by ``RandomPolicy``; ``adaptive-spot*`` are the same with other
spot-check rates: the frontier of wrong results accepted against replication.

Columns are the adversaries' strategies (``STRATEGIES``), each a fresh network:
a fraction of the identities, chosen at random, misbehave. A cheater returns a
wrong output (the true one with a forgery mark appended, so its digest, its commit
and its sealed result are all consistently wrong): independent cheaters each their
own, colluders one shared wrong output. Lazy nodes compute nothing and reveal a
copy of another replica's digest (``Fault.COPY``). Build-then-cheat colluders are
honest for their first 20 placements, then forge (one shared wrong output) wherever
they may be alone: the first replica of a task's first round (a node sees its replica
index and round, not how many replicas the task has: ``streams.topics.node_view``).
Sybils always forge, and an identity whose stake falls under the minimum registers
again as a new one with a new stake (up to ``MAX_SYBILS`` identities each).

Printed per (policy, strategy):

* wrong/10k: tasks verified with a digest other than the honest one, per 10,000
  tasks submitted (± one binomial standard error), and next to it the expectation
  for a majority of 3 drawn uniformly from the fleet with that many colluders: the
  binomial 3f^2(1-f)+f^3 (2.8e-2 at f=0.1, as the issue states) and its exact
  without-replacement (hypergeometric) value for this fleet;
* failed: tasks that ended ``TaskFailed`` (verified + failed = submitted is checked
  and printed);
* eff. replication: replicas assigned (reissues included) / tasks verified;
* time to catch: per adversary identity, its placements up to and including the task
  on which it was first penalized (median, p95), and how many of the adversaries
  were caught at all;
* honest penalized: honest identities penalized at least once (and penalties);
* profit/task: from the ledger, (payouts + stake left - stake put up) per identity,
  summed over the adversaries and divided by the tasks they were placed on; the same
  for honest identities. Slashes are capped by the stake (5 tokens; a dissent costs 1),
  so the nominal figure, with every penalty's full amount, is printed too. The
  compute a node spends is not counted.

Under a fixed policy nothing depends on a node's history, so build-then-cheat nodes
are colluders that start late. After the table, each adaptive policy's break-even:
the spot-check rate above which a cheat loses money, for this task's price and larger
ones. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from allocator.placement import PlacementPolicy  # noqa: E402
from allocator.policies import LearnedPolicy, RandomPolicy  # noqa: E402
from allocator.pricing import PriceBook  # noqa: E402
from allocator.service import Allocator, Windows  # noqa: E402
from allocator.trust import DEFAULT_RULES, TrustRules  # noqa: E402
from destra.sim import (  # noqa: E402
    Compute,
    Heartbeats,
    OnVirtualClock,
    Submitter,
    account_registration,
    node,
    registration,
)
from ledger.book import stake as stake_account  # noqa: E402
from ledger.decider import LedgerDecider, node_wallet  # noqa: E402
from node_runner.logic import Computed, Fault, NodeLogic  # noqa: E402
from schemas import Event, new_event  # noqa: E402
from streams.memory import MemoryRunner  # noqa: E402
from streams.params import DEFAULTS
from streams.processing import Context, Outcome, Recovery, Work  # noqa: E402
from streams.topics import node_view  # noqa: E402
from verifier.proof_of_sync import Reason  # noqa: E402
from verifier.service import Verifier, slash_parameter  # noqa: E402
from workloads import get_workload  # noqa: E402
from workloads.canonical import sha256  # noqa: E402

CPU = torch.device("cpu")
WORKLOAD = "heat2d"
PARAMS = {"grid": "8", "steps": "1"}
STAKE_MICRO = 5_000_000
HEARTBEAT_EVERY_MS = 10_000
TICK_MS = 1_000
RATE = 20
"""Submissions per virtual second."""
SETTLE_MS = 120_000
"""Virtual time after the last submission for the last verdicts."""
NODE_TICK_EVERY_MS = 10_000
"""How often the router ticks every node (they only forget old entries on a tick)."""


# -- the network's policy (rows) ------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkPolicy:
    """How the network decides whom to trust: fixed replicas and quorum, or adaptive
    replication (``allocator.trust``) with its rules."""

    name: str
    replicas: int
    quorum: int
    placement: Callable[[int], PlacementPolicy]
    """seed -> the allocator's placement policy."""
    trust: str = "fixed"
    rules: TrustRules = DEFAULT_RULES


def _adaptive(name: str, **rules: int) -> NetworkPolicy:
    return NetworkPolicy(name, 1, 1, lambda seed: RandomPolicy(seed), "adaptive",
                         dataclasses.replace(DEFAULT_RULES, **rules))


NETWORK_POLICIES: dict[str, NetworkPolicy] = {
    "fixed-3/2": NetworkPolicy("fixed 3 replicas, majority 2, random placement", 3, 2,
                               lambda seed: RandomPolicy(seed)),
    "fixed-3/2-learned": NetworkPolicy("fixed 3 replicas, majority 2, learned placement",
                                       3, 2, lambda seed: LearnedPolicy()),
    "adaptive": _adaptive("adaptive replication, the network's default rules"),
    # The frontier: the spot-check rates traded against the wrong results they let through.
    "adaptive-spot20": _adaptive("adaptive, spot checks 2-20 %", spot_min_permille=20,
                                 spot_max_permille=200),
    "adaptive-spot100": _adaptive("adaptive, spot checks 10-50 %", spot_min_permille=100),
    "adaptive-spot250": _adaptive("adaptive, spot checks 25-50 %", spot_min_permille=250),
    "adaptive-new90": _adaptive("adaptive, newly trusted checked 90 %, then down to 5 %",
                                spot_max_permille=900),
}


# -- the adversaries' strategies (columns) --------------------------------------------------------

@dataclass(frozen=True)
class Strategy:
    """What a fraction of the identities do."""

    name: str
    fraction: float
    """Of the identities, rounded; 0 for the honest baseline."""
    cheat_p: float = 0.0
    """Chance a replica's result is forged (drawn per replica)."""
    collude: bool = False
    """All forge the same wrong output (else each its own)."""
    fault: Fault = Fault.NONE
    """A ``node_runner.logic.Fault`` instead of forging (``COPY``: lazy nodes)."""
    warmup: int = 0
    """Honest for this many placements (to earn trust), then forging only where it may
    run alone: the first replica of a task's first round (a checker's index, 1, or an
    escalation round would give it away)."""
    sybil: bool = False
    """An identity whose stake is spent re-registers as a new one, with a new stake."""


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("honest", 0.0),
    Strategy("always-cheat-10", 0.10, cheat_p=1.0),
    Strategy("rare-cheat-10", 0.10, cheat_p=0.01),
    Strategy("collude-10", 0.10, cheat_p=1.0, collude=True),
    Strategy("collude-30", 0.30, cheat_p=1.0, collude=True),
    Strategy("lazy-copy-10", 0.10, fault=Fault.COPY),
    Strategy("build-cheat-10", 0.10, cheat_p=1.0, collude=True, warmup=20),
    Strategy("sybil-10", 0.10, cheat_p=1.0, sybil=True),
)}
MAX_SYBILS = 20
"""Identities one Sybil adversary may use in a run (each with a new stake)."""


class Forging:
    """A cheater's computation: the honest one, with a forgery mark appended to the output
    on the replicas it chooses to cheat on (a seeded draw per replica)."""

    def __init__(self, inner: Compute, strategy: Strategy, node_id: str, seed: int) -> None:
        self.inner, self.strategy, self.node_id, self.seed = inner, strategy, node_id, seed
        self.tag = b"the group" if strategy.collude else node_id.encode()
        self.forged = 0
        self.runs = 0

    def cheats(self, task_id: str, attempt: int) -> bool:
        draw = hashlib.sha256(f"{self.seed}/{self.node_id}/{task_id}/{attempt}".encode())
        return int.from_bytes(draw.digest()[:8], "big") < self.strategy.cheat_p * 2**64

    def __call__(self, assignment: Event, data_key: bytes | None) -> Computed:
        out = self.inner(assignment, data_key)
        f = assignment.fields  # the node's view: it cannot see whether it runs alone
        self.runs += 1
        if self.strategy.warmup and (self.runs <= self.strategy.warmup or f["round"] > 0
                                     or f["replica_index"] > 0):
            return out
        if not self.cheats(f["task_id"], f["attempt"]):
            return out
        self.forged += 1
        return Computed(out.output + b"\0forged by " + self.tag, out.runtime_ms)


# -- the fleet ------------------------------------------------------------------------------------

class Fleet:
    """Every node's task logic behind one processor: an event goes to the node it names
    (each node's inbox in production), its work comes back to that node. Lazy nodes read
    the reveals already published (as from the public topic)."""

    name = "fleet"
    inputs = frozenset({*NodeLogic.inputs, "ResultRevealed", "TaskVerified", "TaskFailed"})
    recovery = Recovery.NONE

    def __init__(self, nodes: list[NodeLogic]) -> None:
        self.nodes = {n.node_id: n for n in nodes}
        self.reveals: dict[str, list[tuple[str, bytes]]] = {}
        self.next_tick_ms = 0
        for n in nodes:
            n.copy_digest = self._copier(n.node_id)

    def _copier(self, node_id: str) -> Callable[[str], bytes | None]:
        def copy(task_id: str) -> bytes | None:
            return next((d for who, d in self.reveals.get(task_id, []) if who != node_id), None)
        return copy

    @staticmethod
    def _routed(node_id: str, out: Outcome) -> Outcome:
        if out.work:
            out.work = [Work((node_id, w.key), w.run, w.not_before_ms) for w in out.work]
        return out

    def handle(self, event: Event, ctx: Context) -> Outcome:
        f = event.fields
        if event.name == "ResultRevealed":
            self.reveals.setdefault(f["task_id"], []).append((f["node_id"], f["digest"]))
            return Outcome()
        if event.name in ("TaskVerified", "TaskFailed"):
            self.reveals.pop(f["task_id"], None)
            return Outcome()
        n = self.nodes.get(f.get("node_id", ""))
        if n is None:
            return Outcome()
        return self._routed(n.node_id, n.handle(node_view(event), ctx))

    def add(self, n: NodeLogic) -> None:
        """A node joins (a Sybil's new identity)."""
        self.nodes[n.node_id] = n
        n.copy_digest = self._copier(n.node_id)

    def tick(self, ctx: Context) -> Outcome:
        if ctx.now_ms < self.next_tick_ms:
            return Outcome()
        self.next_tick_ms = ctx.now_ms + NODE_TICK_EVERY_MS
        out = Outcome()
        for n in self.nodes.values():
            out += self._routed(n.node_id, n.tick(ctx))
        return out

    def finished(self, key: Any, result: Any, ctx: Context) -> Outcome:
        node_id, inner = key
        return self._routed(node_id, self.nodes[node_id].finished(inner, result, ctx))


# -- one run --------------------------------------------------------------------------------------

@dataclass
class Result:
    """What one (policy, strategy) run measured."""

    policy: str
    strategy: str
    nodes: int
    adversaries: int
    submitted: int = 0
    verified: int = 0
    wrong: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    assigned: int = 0
    forged: int = 0
    caught_after: dict[str, int] = field(default_factory=dict)
    """Adversary -> its placements up to the task it was first penalized on."""
    honest_penalized: Counter[str] = field(default_factory=Counter)
    penalties: Counter[str] = field(default_factory=Counter)
    adversary_net_micro: int = 0
    adversary_nominal_micro: int = 0
    adversary_placed: int = 0
    honest_net_micro: int = 0
    honest_placed: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    plans: Counter[str] = field(default_factory=Counter)
    """First rounds by size (adaptive: 1 alone, 2 spot-checked, 3 bootstrap)."""
    escalations: int = 0
    identities: int = 0
    """Identities the adversaries used (Sybils re-register)."""
    in_flight: int = 0
    wall_s: float = 0.0
    virtual_s: float = 0.0

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())


def honest_digest() -> bytes:
    w = get_workload(WORKLOAD)
    return sha256(w.run(w.validate(dict(PARAMS)), CPU).output)


def run(policy: NetworkPolicy, strategy: Strategy, nodes: int, tasks: int, seed: int = 1,
        progress: Callable[[str], None] | None = None) -> Result:
    """One fresh network, ``tasks`` tasks, under ``policy`` against ``strategy``."""
    started = time.perf_counter()
    rng = random.Random(f"{seed}/{strategy.name}")  # noqa: S311 - who misbehaves, not crypto
    names = [f"n{i:05d}" for i in range(nodes)]
    bad = set(rng.sample(names, round(strategy.fraction * nodes)))
    compute = Compute(reuse=True)
    forgers: dict[str, Forging] = {}
    fleet_nodes = []
    for name in names:
        if name in bad and strategy.cheat_p > 0:
            forgers[name] = Forging(compute, strategy, name, seed)
            fleet_nodes.append(node(name, forgers[name]))
        else:
            fleet_nodes.append(node(name, compute,
                                    strategy.fault if name in bad else Fault.NONE))
    ledger = LedgerDecider("ledger")
    allocator = Allocator("allocator", policy=policy.placement(seed), windows=Windows(),
                          rules=policy.rules)
    verifier = Verifier("verifier", rules=policy.rules)
    alice = Submitter("alice", grants=False)
    fleet = Fleet(fleet_nodes)
    runner = MemoryRunner([], tick_ms=TICK_MS, seed=seed)
    heart = Heartbeats(fleet_nodes, runner.now_ms, every_ms=HEARTBEAT_EVERY_MS)
    runner.processors = [ledger, allocator, OnVirtualClock(verifier), alice, fleet, heart]
    t = runner.now_ms
    runner.publish(account_registration("alice", t))
    runner.publish(new_event("TokensMinted", "treasury", occurred_at=t, account="alice",
                             amount_micro=10**16, reason="sim"))
    for n in fleet_nodes:
        runner.publish(account_registration(f"op-{n.node_id}", t))
        runner.publish(new_event("TokensMinted", "treasury", occurred_at=t,
                                 account=f"op-{n.node_id}", amount_micro=STAKE_MICRO,
                                 reason="sim"))
        runner.publish(registration(n, stake=STAKE_MICRO))
    runner.advance(TICK_MS)
    runner.log.clear()

    truth = honest_digest()
    r = Result(policy.name, strategy.name, nodes, len(bad))
    owner = {name: name for name in bad}
    identities: Counter[str] = Counter(owner.values())

    def respawn(old: str) -> None:
        """A Sybil whose stake is spent comes back as a new identity with a new stake."""
        if identities[owner[old]] >= MAX_SYBILS:
            return
        identities[owner[old]] += 1
        name = f"{owner[old]}.{identities[owner[old]]}"
        owner[name] = owner[old]
        bad.add(name)
        names.append(name)
        forgers[name] = Forging(compute, strategy, name, seed)
        n = node(name, forgers[name])
        fleet.add(n)
        heart.nodes.append(n)
        at = runner.now_ms
        runner.publish(account_registration(f"op-{name}", at))
        runner.publish(new_event("TokensMinted", "treasury", occurred_at=at,
                                 account=f"op-{name}", amount_micro=STAKE_MICRO, reason="sim"))
        runner.publish(registration(n, stake=STAKE_MICRO))

    spent: set[str] = set()
    placed: Counter[str] = Counter()
    index: dict[tuple[str, str], int] = {}
    closed: set[str] = set()

    def harvest() -> None:
        for logged in runner.log:
            e = logged.event
            f = e.fields
            if e.name == "TaskAssigned":
                placed[f["node_id"]] += 1
                index[(f["task_id"], f["node_id"])] = placed[f["node_id"]]
                r.assigned += 1
                if f["replica_index"] == 0 and f["attempt"] == 0:
                    if f["round"] == 0:
                        r.plans[str(f["replicas"] or policy.replicas)] += 1
                    else:
                        r.escalations += 1
            elif e.name == "NodePenalized":
                who = f["node_id"]
                r.penalties[f["reason"]] += 1
                if who in bad:
                    r.adversary_nominal_micro -= f["slash_micro"]
                    r.caught_after.setdefault(who, index.get((f["task_id"], who), 0))
                    if strategy.sybil and who not in spent and ledger.book.balance(
                            stake_account(who)) < policy.rules.min_stake_micro:
                        spent.add(who)
                        respawn(who)
                else:
                    r.honest_penalized[who] += 1
            elif e.name == "TaskVerified" and f["task_id"] not in closed:
                closed.add(f["task_id"])
                r.verified += 1
                r.wrong += f["digest"] != truth
            elif e.name == "TaskFailed" and f["task_id"] not in closed:
                closed.add(f["task_id"])
                r.failed[f["reason"]] += 1
        for _, reason in runner.dead_letters:
            r.dead_letters[reason.split(":")[0]] += 1
        runner.log.clear()
        runner.dead_letters.clear()
        if len(index) > 400_000:  # bounded memory: keep the recent placements only
            for key in list(index)[:200_000]:
                del index[key]

    batch_ms = 1000
    per_batch = RATE
    while r.submitted < tasks:
        for _ in range(min(per_batch, tasks - r.submitted)):
            runner.publish(alice.submission(f"t{r.submitted}", WORKLOAD, dict(PARAMS),
                                            runner.now_ms, replicas=policy.replicas,
                                            quorum=policy.quorum, trust=policy.trust),
                           source="alice")
            r.submitted += 1
        runner.advance(batch_ms)
        harvest()
        if progress is not None and r.submitted % 10_000 == 0:
            progress(f"    {r.submitted:,} tasks, {time.perf_counter() - started:,.0f} s wall")
    runner.advance(SETTLE_MS)
    harvest()
    r.in_flight = r.submitted - r.verified - r.failed_total
    r.identities = sum(identities.values())
    r.adversaries = len(bad)
    r.forged = sum(f.forged for f in forgers.values())
    book = ledger.book
    for name in names:
        net = book.balance(node_wallet(name)) + book.balance(stake_account(name)) - STAKE_MICRO
        if name in bad:
            r.adversary_net_micro += net
            r.adversary_nominal_micro += book.balance(node_wallet(name))
            r.adversary_placed += placed[name]
        else:
            r.honest_net_micro += net
            r.honest_placed += placed[name]
    r.wall_s = time.perf_counter() - started
    r.virtual_s = (runner.now_ms - t) / 1000
    return r


# -- report ---------------------------------------------------------------------------------------

def majority_of_3(f: float) -> float:
    """P(at least 2 of 3 replicas are colluders), each drawn independently with chance f."""
    return 3 * f * f * (1 - f) + f ** 3


def majority_of_3_exact(bad: int, n: int) -> float:
    """The same for 3 distinct identities drawn uniformly from ``n`` of which ``bad`` collude."""
    if n < 3:
        return float("nan")
    return (math.comb(bad, 2) * (n - bad) + math.comb(bad, 3)) / math.comb(n, 3)


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)])


def row(r: Result, strategy: Strategy) -> str:
    per10k = 1e4 * r.wrong / max(1, r.submitted)
    p = r.wrong / max(1, r.submitted)
    se = 1e4 * math.sqrt(p * (1 - p) / max(1, r.submitted))
    if strategy.collude and strategy.cheat_p == 1.0 and not strategy.warmup:
        expect = (f"{1e4 * majority_of_3(strategy.fraction):7.1f} "
                  f"{1e4 * majority_of_3_exact(r.adversaries, r.nodes):7.1f}")
    else:
        expect = f"{'-':>7} {'-':>7}"
    caught = list(r.caught_after.values())
    catch = (f"{statistics.median(caught):6.0f} {percentile(caught, 0.95):6.0f}"
             if caught else f"{'-':>6} {'-':>6}")
    repl = r.assigned / r.verified if r.verified else float("nan")
    adv = (f"{r.adversary_net_micro / r.adversary_placed:9,.0f} "
           f"{r.adversary_nominal_micro / r.adversary_placed:9,.0f}"
           if r.adversary_placed else f"{'-':>9} {'-':>9}")
    honest = r.honest_net_micro / r.honest_placed if r.honest_placed else float("nan")
    return (f"{r.strategy:<16} {r.adversaries:>5} {per10k:8.1f} ±{se:5.1f} {expect} "
            f"{r.failed_total:>6} {repl:6.2f} {catch} {len(caught):>5}/{r.adversaries:<5} "
            f"{len(r.honest_penalized):>5} {sum(r.honest_penalized.values()):>6} {adv} "
            f"{honest:8,.0f} {r.wall_s:6.0f}")


HEADER = (f"{'strategy':<16} {'adver':>5} {'wrong/10k':>8} {'± se':>6} {'binom':>7} "
          f"{'exact':>7} {'failed':>6} {'repl':>6} {'catch':>6} {'p95':>6} "
          f"{'caught':>11} {'hon.id':>5} {'hon.pn':>6} {'adv/task':>9} {'nominal':>9} "
          f"{'hon/task':>8} {'wall s':>6}")


def break_even(policy: NetworkPolicy) -> list[str]:
    """When cheating stops paying, under this policy's rules (``TrustRules.slash_multiple``).

    A node running a task alone that returns a wrong result without computing saves at
    most the price g it is paid (its compute cost, if it works for no profit); checked
    with chance p it is paid nothing and loses the slash S. Cheating gains
    (1 - p) g - p S per task, negative when p > g / (g + S)."""
    rules = policy.rules
    w = get_workload(WORKLOAD)
    units = w.compute_units(w.validate(dict(PARAMS)))
    out = [f"Break-even ({policy.name}): spot-check rate {rules.spot_min_permille / 10:g}-"
           f"{rules.spot_max_permille / 10:g} %, dissent slash max(1 token, "
           f"{rules.slash_multiple} x price), stake needed to run alone >= the slash"]
    for label, price in (("this bench's task", PriceBook().quote(
            WORKLOAD, units, 1, "consumer", 0, 1, "adaptive").price_micro),
                         ("a 10-token task", 10_000_000), ("a 1,000-token task", 10**9)):
        slash = rules.dissent_slash_micro(price, DEFAULTS[slash_parameter(Reason.DISSENT)])
        p_star = price / (price + slash)
        p_min = rules.spot_min_permille / 1000
        ev = (1 - p_min) * price - p_min * slash
        out.append(f"  {label}: price g {price:,} micro, slash S {slash:,}: break-even p* = "
                   f"g/(g+S) = {p_star:.2%}; at the lowest rate {p_min:.0%} a cheat gains "
                   f"{ev:+,.0f} micro ({'a loss' if ev < 0 else 'a GAIN'})")
    return out


def commit_of_tree() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                               text=True, check=True, cwd=Path(__file__).parent).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--tasks", type=int, default=5_000, help="per strategy")
    parser.add_argument("--quick", action="store_true", help="200 nodes, 2,000 tasks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--networks", default="fixed-3/2",
                        help=f"comma-separated, of {', '.join(NETWORK_POLICIES)}")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated, of {', '.join(STRATEGIES)}")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    nodes, tasks = (200, 2_000) if args.quick else (args.nodes, args.tasks)
    torch.set_num_threads(1)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"# bench/trust.py commit {commit_of_tree()} "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} args: {' '.join(sys.argv[1:])}")
    say(f"{nodes:,} identities (each its own operator, stake {STAKE_MICRO / 1e6:g} tokens), "
        f"{tasks:,} tasks per strategy ({WORKLOAD} {PARAMS}, plain inputs, {RATE} tasks per "
        f"virtual s), seed {args.seed}; the real ledger, allocator, verifier and node task "
        "logic on the in-memory runner; the workload run once, its output reused")
    say("")
    say("wrong/10k: verified with a wrong digest per 10,000 submitted (± binomial s.e.); "
        "binom: 3f^2(1-f)+f^3 per 10,000 (f = colluding share), exact: the same drawn "
        "without replacement from this fleet; failed: TaskFailed; repl: replicas assigned "
        "/ tasks verified; catch, p95: an adversary's placements up to its first penalty "
        "(median, p95), caught: adversaries penalized at least once; hon.id, hon.pn: honest "
        "identities penalized, and their penalties; adv/task: micro-tokens (payouts + stake "
        "left - stake) per adversary per task it was placed on, nominal: with every "
        "penalty's full amount (slashes are capped by the stake); hon/task: the same for "
        "honest identities (compute spent not counted)")
    results: list[Result] = []
    for key in args.networks.split(","):
        policy = NETWORK_POLICIES[key]
        say("")
        say(f"Network policy: {key} = {policy.name}")
        say(HEADER)
        for name in args.strategies.split(","):
            strategy = STRATEGIES[name]
            r = run(policy, strategy, nodes, tasks, args.seed,
                    progress=lambda s: print(s, flush=True))
            results.append(r)
            say(row(r, strategy))
    say("")
    policy_of = {p.name: p for p in NETWORK_POLICIES.values()}
    strategy_of = STRATEGIES
    for r in results:
        extra = []
        if r.in_flight:
            extra.append(f"{r.in_flight} still in flight")
        if r.forged:
            extra.append(f"{r.forged:,} replicas forged")
        if r.plans and policy_of[r.policy].trust == "adaptive":
            sizes = ", ".join(f"{k} replica{'s' if k != '1' else ''} {v / r.submitted:.1%}"
                              for k, v in sorted(r.plans.items()))
            extra.append(f"first rounds: {sizes}; escalated {r.escalations:,}")
        if strategy_of[r.strategy].sybil:
            extra.append(f"{r.identities:,} adversary identities in all (Sybil "
                         "re-registrations included)")
        failed = ", ".join(f"{k} {v}" for k, v in r.failed.items()) or "none"
        say(f"{r.policy} / {r.strategy}: submitted {r.submitted:,} = verified {r.verified:,} "
            f"+ failed {r.failed_total:,} ({failed}) + in flight {r.in_flight}: "
            f"{r.submitted == r.verified + r.failed_total}; penalties "
            f"{dict(r.penalties) or 'none'}; dead letters {dict(r.dead_letters) or 'none'}; "
            f"{r.virtual_s:,.0f} virtual s" + (f"; {', '.join(extra)}" if extra else ""))
    total = sum(r.wall_s for r in results)
    done = sum(r.submitted for r in results)
    say("")
    say(f"Speed: {done / total:,.0f} tasks/s wall over {len(results)} runs "
        f"({total:,.0f} s); at that rate 100,000 tasks per strategy take "
        f"~{100_000 / (done / total) / 60:,.0f} min each")
    for key in args.networks.split(","):
        policy = NETWORK_POLICIES[key]
        if policy.trust == "adaptive":
            say("")
            for line in break_even(policy):
                say(line)
    say(f"Dissent slash {DEFAULTS[slash_parameter(Reason.DISSENT)] / 1e6:g} tokens, no-reveal "
        f"{DEFAULTS[slash_parameter(Reason.NO_REVEAL)] / 1e6:g}.")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
