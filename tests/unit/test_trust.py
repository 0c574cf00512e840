"""Adaptive trust (``allocator.trust``) on the in-memory runner: reputation, single-replica
placement, spot checks, escalation rounds, their money and their recovery."""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Iterable

import pytest

from allocator.service import Allocator
from allocator.trust import Record, Reputation, TrustRules
from destra.sim import Compute, Sim
from ledger.book import escrow, stake
from ledger.decider import node_wallet
from node_runner.logic import Computed
from schemas import Event, new_event
from streams.journal import full_state, restore_full
from streams.processing import Context, Outcome
from streams.topics import node_view
from verifier.service import Verifier
from workloads import get_workload
from workloads.canonical import sha256

PARAMS = {"grid": "8", "steps": "1"}
FAST = TrustRules(trusted_after=3)
ALWAYS_CHECK = TrustRules(trusted_after=3, spot_min_permille=1000, spot_max_permille=1000)
NEVER_ALONE_CHECKED = TrustRules(trusted_after=3, spot_min_permille=1, spot_max_permille=1)


def truth() -> bytes:
    w = get_workload("heat2d")
    return sha256(w.run(w.validate(dict(PARAMS)), Compute().__class__.__call__.__globals__[
        "CPU"]).output)


class Cheats:
    """Honest computation, forged for the named nodes (after ``honest_runs`` of theirs),
    or for whichever nodes hold the named (round, replica index) places: colluders, all
    forging the same way."""

    def __init__(self, cheaters: Iterable[str] = (), honest_runs: int = 0,
                 places: Iterable[tuple[int, int]] = ()) -> None:
        self.inner = Compute(reuse=True)
        self.cheaters, self.honest_runs = set(cheaters), honest_runs
        self.places = set(places)
        self.runs: Counter[str] = Counter()
        self.forgers: list[tuple[str, str]] = []

    def __call__(self, assignment: Event, data_key: bytes | None) -> Computed:
        out = self.inner(assignment, data_key)
        f = assignment.fields
        node = f["node_id"]
        self.runs[node] += 1
        if (node in self.cheaters and self.runs[node] > self.honest_runs) or \
                (f["round"], f["replica_index"]) in self.places:
            self.forgers.append((f["task_id"], node))
            return Computed(out.output + b"\0forged by the group", out.runtime_ms)
        return out


def run_tasks(sim: Sim, count: int, start: int = 0, every_ms: int = 2_000) -> list[str]:
    ids = [f"t{i}" for i in range(start, start + count)]
    for task_id in ids:
        sim.submit(task_id, params=dict(PARAMS), trust="adaptive", replicas=1, quorum=1)
        sim.runner.advance(every_ms)
    sim.runner.advance(90_000)
    return ids


def first_round_sizes(sim: Sim, ids: list[str]) -> Counter[int]:
    return Counter(e.fields["replicas"] for e in sim.runner.events("TaskAssigned")
                   if e.fields["task_id"] in ids and e.fields["round"] == 0
                   and e.fields["replica_index"] == 0)


def penalties(sim: Sim) -> Counter[tuple[str, str]]:
    return Counter((e.fields["node_id"], e.fields["reason"])
                   for e in sim.runner.events("NodePenalized"))


def verdicts(sim: Sim, ids: list[str]) -> dict[str, Event]:
    return {e.fields["task_id"]: e for e in sim.runner.events("TaskVerified", "TaskFailed")
            if e.fields["task_id"] in ids}


# -- the rules -----------------------------------------------------------------------------------

def test_trust_is_earned_by_a_streak_and_lost_by_a_dissent_or_a_spent_stake() -> None:
    rules = TrustRules(trusted_after=2, min_stake_micro=1_000_000)
    rep = Reputation()
    rep.on_registered("a", 5)
    assert not rules.eligible(rep.get("a")) and not rules.trusted(rep.get("a"))
    rep.on_stake("a", 3_000_000)
    assert rules.eligible(rep.get("a")) and not rules.trusted(rep.get("a"))
    rep.on_verdict([{"node_id": "a", "agreed": True}, {"node_id": "b", "agreed": True}])
    rep.on_verdict([{"node_id": "a", "agreed": True}])
    assert rules.trusted(rep.get("a")) and rep.get("b") is None  # b never registered
    rep.on_penalized("a", "no_show")
    assert rules.trusted(rep.get("a")), "a no-show is not a wrong answer"
    rep.on_verdict([{"node_id": "a", "agreed": False}])
    record = rep.get("a")
    assert record is not None and (record.streak, record.dissents, record.agreements) == (0, 1, 2)
    assert not rules.trusted(record)
    for _ in range(3):
        rep.on_verdict([{"node_id": "a", "agreed": True}])
    assert not rules.trusted(rep.get("a")), "after a dissent it takes twice the streak"
    rep.on_verdict([{"node_id": "a", "agreed": True}])
    assert rules.trusted(rep.get("a"))
    rep.on_stake("a", -2_500_000)  # slashed under the minimum
    assert not rules.eligible(rep.get("a")) and not rules.trusted(rep.get("a"))


def test_the_spot_check_rate_falls_with_the_streak_rises_as_stake_shrinks_never_zero() -> None:
    rules = TrustRules()
    rate = [rules.spot_permille(Record(0, 5_000_000, streak=s)) for s in (10, 50, 10_000)]
    assert rate[0] == rules.spot_max_permille > rate[1] > rate[2] == rules.spot_min_permille
    poorer = rules.spot_permille(Record(0, 2_500_000, streak=50))
    richer = rules.spot_permille(Record(0, 50_000_000, streak=50))
    assert poorer == 2 * rate[1] and richer == rate[1]
    assert rules.slash_multiple * rules.spot_min_permille <= 1000
    with pytest.raises(ValueError):
        TrustRules(spot_min_permille=0)


def test_the_plan_is_hidden_from_the_node() -> None:
    assigned = new_event("TaskAssigned", "allocator", task_id="t", node_id="n", replica_index=0,
                         attempt=0, commit_deadline=1, reveal_deadline=2, replicas=1, quorum=1,
                         signature=b"x" * 64, signer="allocator")
    view = node_view(assigned)
    assert (view.fields["replicas"], view.fields["quorum"]) == (0, 0)
    assert view.signature is None, "a changed copy is signed anew by its sender"
    assert view.event_id == assigned.event_id and view.fields["task_id"] == "t"
    plain = assigned.replace(replicas=0, quorum=0)
    assert node_view(plain) is plain


# -- the network ---------------------------------------------------------------------------------

def test_a_trusted_node_runs_tasks_alone_and_earns_the_whole_escrow() -> None:
    sim = Sim(nodes=5, rules=NEVER_ALONE_CHECKED, compute=Cheats())
    warm = run_tasks(sim, 6)
    assert first_round_sizes(sim, warm)[3] >= 1, "nobody is trusted at first: bootstrap"
    ids = run_tasks(sim, 10, start=6)
    sizes = first_round_sizes(sim, ids)
    assert sizes[1] >= 8, sizes
    alone = [e for e in sim.runner.events("TaskVerified") if e.fields["task_id"] in ids
             and len(e.fields["contributions"]) == 1]
    assert alone and all(e.fields["digest"] == truth() for e in alone)
    task = alone[0].fields["task_id"]
    paid = [e for e in sim.runner.events("LedgerEntryPosted")
            if e.fields["task_id"] == task and e.fields["kind"] in ("payout", "fee", "refund")
            and e.fields["amount_micro"] > 0]
    submitted = next(e for e in sim.runner.events("TaskSubmitted")
                     if e.fields["task_id"] == task)
    assert sum(e.fields["amount_micro"] for e in paid) == submitted.fields["quoted_price_micro"]
    assert not any(e.fields["kind"] == "refund" for e in paid), "one replica: nothing back"
    assert sim.balance(escrow(task)) == 0
    assert not penalties(sim)


def test_a_spot_check_catches_a_trusted_node_that_turns_to_cheating() -> None:
    compute = Cheats({"n1"}, honest_runs=6)
    sim = Sim(nodes=5, rules=ALWAYS_CHECK, compute=compute)
    ids = run_tasks(sim, 40)
    out = verdicts(sim, ids)
    assert len(out) == 40 and all(e.name == "TaskVerified" for e in out.values())
    assert all(e.fields["digest"] == truth() for e in out.values()), "no wrong result accepted"
    caught = penalties(sim)
    assert caught[("n1", "dissent")] >= 1
    assert all(node == "n1" for node, _ in caught), caught
    record = sim.allocator.reputation.get("n1")
    assert record is not None and record.dissents >= 1
    # Each disputed task went to a round of 3 fresh nodes of other operators.
    rounds = [e for e in sim.runner.events("TaskAssigned") if e.fields["round"] == 1]
    assert rounds and all(e.fields["replicas"] == 3 for e in rounds)
    for task in {e.fields["task_id"] for e in rounds}:
        nodes = [e.fields["node_id"] for e in sim.runner.events("TaskAssigned")
                 if e.fields["task_id"] == task]
        assert len(nodes) == len(set(nodes)), "no node runs twice for one task"
        verdict = out[task]
        agreed = {c["node_id"] for c in verdict.fields["contributions"] if c["agreed"]}
        assert "n1" not in agreed and len(agreed) >= 3


def test_colluders_on_one_task_cannot_outvote_an_honest_replica() -> None:
    """Bootstrap: three replicas, two of them colluders returning the same wrong digest:
    the dissent escalates to three fresh nodes, whose majority decides; both colluders are
    slashed, and every agreeing replica of either round shares the escrow."""
    compute = Cheats(places={(0, 0), (0, 1)})
    sim = Sim(nodes=7, rules=FAST, compute=compute)
    ids = run_tasks(sim, 1)
    verdict = verdicts(sim, ids)["t0"]
    assert verdict.name == "TaskVerified" and verdict.fields["digest"] == truth()
    colluders = {node for _, node in compute.forgers}
    assert len(colluders) == 2
    assert set(penalties(sim)) == {(n, "dissent") for n in colluders}
    for n in colluders:
        assert sim.balance(stake(n)) == 4_000_000, "one dissent: 1 token (its price is less)"
    contributions = verdict.fields["contributions"]
    assert len(contributions) == 6, "both rounds are named"
    agreed = [c["node_id"] for c in contributions if c["agreed"]]
    assert len(agreed) == 4 and not colluders & set(agreed)
    assert {c["node_id"] for c in contributions if not c["agreed"]} == colluders
    price = next(e for e in sim.runner.events("TaskSubmitted")).fields["quoted_price_micro"]
    gross = {n: sum(e.fields["amount_micro"] for e in sim.runner.events("LedgerEntryPosted")
                    if e.fields["task_id"] == "t0" and e.fields["account"] == node_wallet(n))
             for n in agreed}
    assert len(set(gross.values())) == 1 and min(gross.values()) > 0, gross
    assert sim.balance(escrow("t0")) == 0
    assert price * 0.9 < sum(gross.values()) <= price, "shared pro rata, the fee aside"


def test_a_second_disagreeing_round_escalates_to_five_fresh_replicas() -> None:
    """Round 1 disagrees too (a colluder in it): round 2 of five fresh nodes decides."""
    compute = Cheats(places={(0, 0), (0, 1), (1, 0)})
    sim = Sim(nodes=12, rules=FAST, compute=compute)
    ids = run_tasks(sim, 1)
    verdict = verdicts(sim, ids)["t0"]
    assert verdict.name == "TaskVerified" and verdict.fields["digest"] == truth()
    sizes = Counter(e.fields["round"] for e in sim.runner.events("TaskAssigned"))
    assert sizes == {0: 3, 1: 3, 2: 5}
    assert len(penalties(sim)) == 3


def test_a_dissent_slash_is_sized_by_the_price_and_alone_needs_the_stake_to_cover_it() -> None:
    rules = TrustRules()
    assert rules.dissent_slash_micro(10, 1_000_000) == 1_000_000
    assert rules.dissent_slash_micro(10_000_000, 1_000_000) == 20 * 10_000_000
    # At the lowest spot-check rate a cheat loses: (1 - p) g - p S < 0.
    g = 10_000_000
    p = rules.spot_min_permille / 1000
    assert (1 - p) * g - p * rules.dissent_slash_micro(g, 1_000_000) <= 0


class CrashesAtRound:
    """The allocator, until it crashes on reading an escalation round's request: from then
    on what it would have read waits in its input topics (``unread``)."""

    def __init__(self, inner: Allocator) -> None:
        self.inner = inner
        self.name, self.inputs, self.recovery = inner.name, inner.inputs, inner.recovery
        self.unread: list[Event] = []

    def handle(self, event: Event, ctx: Context) -> Outcome:
        if event.name == "ReissueRequested" and event.fields["replicas"] > 0:
            self.unread.append(event)
        if self.unread:
            if event not in self.unread:
                self.unread.append(event)
            return Outcome()
        return self.inner.handle(event, ctx)

    def tick(self, ctx: Context) -> Outcome:
        return Outcome() if self.unread else self.inner.tick(ctx)


def test_mid_escalation_the_allocator_and_verifier_rebuild_from_their_snapshots() -> None:
    """A crash between the dispute and the next round's placement: the allocator is down
    when the verifier asks for round 1, then both processors come back from their
    snapshots (and journals); the allocator reads what it missed, places the round, and
    the task ends with the honest digest."""
    compute = Cheats(places={(0, 0)})
    sim = Sim(nodes=6, rules=FAST, compute=compute)
    index = sim.runner.processors.index(sim.allocator)
    down = CrashesAtRound(sim.allocator)
    sim.runner.processors[index] = down
    sim.submit("t0", params=dict(PARAMS), trust="adaptive", replicas=1, quorum=1)
    sim.runner.run_until(lambda: bool(down.unread), 60_000)
    assert "t0" in sim.verifier.rounds
    assert any(e.name == "ReissueRequested" and e.fields["replicas"] == 3 for e in down.unread)
    allocator = Allocator("allocator", policy=sim.allocator.policy, rules=FAST)
    restore_full(allocator, pickle.loads(pickle.dumps(full_state(sim.allocator))))
    verifier = Verifier("verifier", rules=FAST)
    restore_full(verifier, pickle.loads(pickle.dumps(full_state(sim.verifier))))
    sim.runner.processors[index] = allocator
    holder = next(p for p in sim.runner.processors if getattr(p, "inner", None) is sim.verifier)
    holder.inner = verifier  # type: ignore[attr-defined]
    for event in down.unread:  # read again from its committed positions
        sim.runner._apply(index, allocator.handle(event, sim.runner._ctx()))  # noqa: SLF001
    sim.runner.settle()
    sim.runner.advance(90_000)
    out = verdicts(sim, ["t0"])
    assert out["t0"].name == "TaskVerified" and out["t0"].fields["digest"] == truth()
    (forger,) = {node for _, node in compute.forgers}
    assert penalties(sim) == {(forger, "dissent"): 1}
    assert sum(e.fields["round"] == 1 for e in sim.runner.events("TaskAssigned")) == 3


@pytest.mark.parametrize("deadline_ms", [60_000, 600_000])
def test_a_round_nobody_can_place_fails_the_task_and_judges_nobody(deadline_ms: int) -> None:
    """Four nodes: two colluders outnumber the honest replica of the bootstrap round and
    no three fresh operators are left for round 1. The colluders' majority is not taken:
    the task fails (at its deadline, or when the round's grace period is over), refunded."""
    compute = Cheats(places={(0, 0), (0, 1)})
    sim = Sim(nodes=4, rules=FAST, compute=compute)
    sim.submit("t0", params=dict(PARAMS), trust="adaptive", replicas=1, quorum=1,
               deadline_ms=deadline_ms)
    sim.runner.advance(150_000)
    verdict = sim.verdict("t0")
    assert verdict is not None and verdict.name == "TaskFailed"
    assert verdict.fields["reason"] == ("deadline_passed" if deadline_ms < 60_001
                                        else "no_quorum")
    assert sim.balance(escrow("t0")) == 0 and not penalties(sim)


def test_an_adaptive_plan_under_the_submitters_floor_is_refused() -> None:
    sim = Sim(nodes=4, rules=FAST)
    sim.submit("t0", params=dict(PARAMS), trust="adaptive", replicas=3, quorum=2)
    sim.runner.advance(60_000)
    sizes = first_round_sizes(sim, ["t0"])
    assert sizes and min(sizes) >= 3, "the floor of 3 replicas holds"
    verdict = sim.verdict("t0")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert len(verdict.fields["contributions"]) >= 3


def test_a_node_caught_once_needs_twice_the_streak_to_run_alone_again() -> None:
    rules = TrustRules(trusted_after=3)
    rep = Reputation()
    rep.on_registered("a", 0)
    rep.on_stake("a", 5_000_000)
    for agreed in [True] * 3 + [False] + [True] * 5:
        rep.on_verdict([{"node_id": "a", "agreed": agreed}])
    record = rep.get("a")
    assert record is not None and record.streak == 5 and not rules.trusted(record)
    rep.on_verdict([{"node_id": "a", "agreed": True}])
    assert rules.trusted(record) and rules.streak_needed(record) == 6
    assert rules.spot_permille(record) == rules.spot_max_permille, "just trusted again"
    record.dissents = 30
    assert rules.streak_needed(record) == 3 * 16
