"""Disputes by bisection over checkpoints, wired (``verifier.service``, issue 12 item 4), on
the in-memory runner: an adaptive task's first round that disagrees over a checkpointed
workload is settled by ``first_divergence`` over the revealed leaves, a checked pre-state
and ONE re-executed segment, not by a round of full reruns."""

from __future__ import annotations

import functools
import pickle
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from allocator.trust import TrustRules
from destra.crypto import sign_event
from destra.sim import CPU, Compute, Sim, keys_for
from ledger.book import escrow
from ledger.decider import node_wallet
from node_runner.logic import Computed, Fault
from schemas import Event, new_event
from streams.journal import full_state, restore_full
from streams.processing import Context, Outcome
from verifier.service import Verifier
from workloads import get_workload
from workloads.base import deterministic
from workloads.canonical import sha256
from workloads.checkpoints import checkpointed, leaf_of, run_segment

FAST = TrustRules(trusted_after=3)
PARAMS = {"hidden": "8", "epochs": "8", "seed": "7"}
"""mlp-digits: 8 segments of one epoch each (11 Adam steps an epoch)."""
MLP = get_workload("mlp-digits")
CKPT = checkpointed(MLP)
P = MLP.validate(dict(PARAMS))


@functools.cache
def honest_digest() -> bytes:
    return sha256(MLP.run(dict(P), CPU).output)


@functools.cache
def forged_run(at: int) -> Computed:
    """The checkpointed run, with the state tampered with after segment ``at`` and
    continued from there: consistent leaves from ``at`` on, all wrong, and a wrong
    output. ``at = -1``: the honest run (cached: the tests share it)."""
    with deterministic(CPU):
        state = CKPT.initial_state(P, CPU)
        leaves, states = [], []
        for segment in range(CKPT.segments(P)):
            state = CKPT.advance(P, state, segment, CPU)
            if segment == at:
                state.weights["w1"] = state.weights["w1"] + 0.05
            leaves.append(leaf_of(CKPT, state))
            states.append(CKPT.state_bytes(state))
        result = CKPT.final_result(P, state, CPU)
    return Computed(result.output, result.runtime_ms, tuple(leaves), tuple(states))


class Forges:
    """Honest computation (checkpointed), forged from segment ``at`` on by whichever
    nodes hold the named (round, replica index) places; ``on_forge`` sees each forger."""

    def __init__(self, places: Iterable[tuple[int, int]], at: int,
                 on_forge: Callable[[str], None] = lambda node: None,
                 real: bool = False) -> None:
        self.inner = Compute(reuse=True)
        self.places, self.at, self.on_forge = set(places), at, on_forge
        self.real = real
        """Honest full runs through the node's own code (``run_assignment``), not the
        shared cached run."""
        self.forgers: list[str] = []
        self.full_runs = 0

    def __call__(self, assignment: Event, data_key: bytes | None) -> Computed:
        f = assignment.fields
        if f["segment"] < 0:
            self.full_runs += 1
        if (f["round"], f["replica_index"]) in self.places and f["segment"] < 0:
            self.forgers.append(f["node_id"])
            self.on_forge(f["node_id"])
            return forged_run(self.at)
        if f["segment"] < 0 and not self.real:
            return forged_run(-1)
        return self.inner(assignment, data_key)


def penalties(sim: Sim) -> Counter[tuple[str, str]]:
    return Counter((e.fields["node_id"], e.fields["reason"])
                   for e in sim.runner.events("NodePenalized"))


def assigned(sim: Sim) -> list[Event]:
    return sim.runner.events("TaskAssigned")


def run_one(sim: Sim, ms: int = 150_000) -> Event:
    sim.submit("t0", workload="mlp-digits", params=dict(PARAMS), trust="adaptive",
               replicas=1, quorum=1)
    sim.runner.advance(ms)
    verdict = sim.verdict("t0")
    assert verdict is not None
    return verdict


def paid(sim: Sim, node: str) -> int:
    return sum(e.fields["amount_micro"] for e in sim.runner.events("LedgerEntryPosted")
               if e.fields["task_id"] == "t0" and e.fields["account"] == node_wallet(node))


def steps_of(state: bytes) -> int:
    return int(CKPT.state_from_bytes(P, state, CPU).step)


def test_a_forged_training_run_is_caught_by_one_referee_segment_not_a_round_of_reruns(
        ) -> None:
    """THE DONE-WHEN TEST. Bootstrap round of three; one forges its MLP training from
    segment 3 on. Bisection finds segment 3, both sides are asked for checkpoint 2, the
    referee re-executes segment 3 alone: the honest digest wins, the forger is slashed,
    and the dispute cost one segment: at most 1/8 of one full run, 1/24 of the three full
    reruns an escalation round would have cost."""
    at = 3
    compute = Forges({(0, 0)}, at, real=True)
    sim = Sim(nodes=5, rules=FAST, compute=compute)
    verdict = run_one(sim)
    assert verdict.name == "TaskVerified"
    assert verdict.fields["digest"] == honest_digest()
    (forger,) = compute.forgers
    assert penalties(sim) == {(forger, "dissent"): 1}, "the forger only, for dissent"

    referees = [e for e in assigned(sim) if e.fields["segment"] >= 0]
    assert len(referees) == 1, "exactly one referee"
    (ref,) = referees
    assert ref.fields["segment"] == at and ref.fields["round"] == 1
    assert ref.fields["pre_state"] is not None
    full_later = [e for e in assigned(sim) if e.fields["round"] > 0 and e.fields["segment"] < 0]
    assert not full_later, "no escalation round of full reruns"
    requests = sim.runner.events("CheckpointRequested")
    assert len(requests) == 2 and {e.fields["checkpoint"] for e in requests} == {at - 1}
    assert compute.full_runs == 3, "the bootstrap round's three runs, and nothing else full"

    # The compute the dispute used: the referee's segment, against a full rerun.
    contributions = {c["node_id"]: c for c in verdict.fields["contributions"]}
    task_units = MLP.compute_units(P)
    referee = contributions[ref.fields["node_id"]]
    assert referee["agreed"] and referee["compute_units"] == CKPT.segment_units(P)
    assert referee["compute_units"] * CKPT.segments(P) <= task_units
    escalation_units = 3 * task_units  # what round 1 of three full replicas would run
    assert referee["compute_units"] / escalation_units < 1 / 20
    # Its real optimizer steps: from the exact pre-state to its post-state.
    pre = ref.fields["pre_state"]
    _, post_leaf, post = run_segment(CKPT, P, at, pre, CPU)
    ran, total = steps_of(post) - steps_of(pre), int(
        CKPT.state_from_bytes(P, forged_run(-1).states[-1], CPU).step)
    assert (ran, total) == (11, 88), "one epoch of eight"
    assert ran * CKPT.segments(P) == total
    referee_reveal = next(e for e in sim.runner.events("ResultRevealed")
                          if e.fields["node_id"] == ref.fields["node_id"])
    assert referee_reveal.fields["digest"] == post_leaf and not referee_reveal.fields[
        "checkpoints"]

    honest = {n for n, c in contributions.items() if c["agreed"]} - {ref.fields["node_id"]}
    assert len(honest) == 2 and forger not in honest
    assert all(contributions[n]["compute_units"] == task_units for n in honest)
    assert contributions[forger] == {"node_id": forger, "compute_units": 0, "agreed": False}
    assert paid(sim, ref.fields["node_id"]) > 0, "the referee is paid for its segment"
    assert all(paid(sim, n) > 5 * paid(sim, ref.fields["node_id"]) for n in honest)
    assert paid(sim, forger) == 0 and sim.balance(escrow("t0")) == 0
    # Every full replica revealed its eight signed leaves.
    leaves = [e.fields["checkpoints"] for e in sim.runner.events("ResultRevealed")
              if e.fields["node_id"] != ref.fields["node_id"]]
    assert len(leaves) == 3 and all(len(x) == 8 for x in leaves)


def test_a_divergence_at_segment_zero_needs_no_pre_state() -> None:
    compute = Forges({(0, 1)}, at=0)
    sim = Sim(nodes=5, rules=FAST, compute=compute)
    verdict = run_one(sim)
    assert verdict.name == "TaskVerified" and verdict.fields["digest"] == honest_digest()
    assert not sim.runner.events("CheckpointRequested")
    (ref,) = [e for e in assigned(sim) if e.fields["segment"] >= 0]
    assert ref.fields["segment"] == 0 and ref.fields["pre_state"] is None
    (forger,) = compute.forgers
    assert penalties(sim) == {(forger, "dissent"): 1}


def test_a_checkpoint_that_misses_the_agreed_leaf_is_dead_lettered_and_the_other_is_used(
        ) -> None:
    sim: Sim

    def lie(node: str) -> None:
        next(n for n in sim.nodes if n.node_id == node).fault = Fault.BAD_CHECKPOINT

    compute = Forges({(0, 2)}, at=5, on_forge=lie)
    sim = Sim(nodes=5, rules=FAST, compute=compute)
    verdict = run_one(sim)
    assert verdict.name == "TaskVerified" and verdict.fields["digest"] == honest_digest()
    (forger,) = compute.forgers
    refused = [(e, why) for e, why in sim.runner.dead_letters
               if e.name == "CheckpointProvided"]
    assert len(refused) == 1
    event, why = refused[0]
    assert event.fields["node_id"] == forger
    assert why.startswith("bad-checkpoint:") and "does not hash to the agreed leaf" in why
    (ref,) = [e for e in assigned(sim) if e.fields["segment"] >= 0]
    honest_state = next(e.fields["state"] for e in sim.runner.events("CheckpointProvided")
                        if e.fields["node_id"] != forger)
    assert ref.fields["pre_state"] == honest_state
    assert penalties(sim) == {(forger, "dissent"): 1}


def test_when_no_side_gives_a_valid_checkpoint_the_dispute_escalates_by_rounds() -> None:
    compute = Forges({(0, 0)}, at=4)
    sim = Sim(nodes=7, rules=FAST, compute=compute)
    for n in sim.nodes:
        n.fault = Fault.BAD_CHECKPOINT
    verdict = run_one(sim, 200_000)
    assert verdict.name == "TaskVerified" and verdict.fields["digest"] == honest_digest()
    assert sum(e.name == "CheckpointProvided" for _, e in
               [(0, e) for e, _ in sim.runner.dead_letters]) == 2
    assert not [e for e in assigned(sim) if e.fields["segment"] >= 0], "no referee"
    rounds = Counter(e.fields["round"] for e in assigned(sim))
    assert rounds == {0: 3, 2: 3}, "round 1 was the referee's, never placed; round 2 is full"
    (forger,) = compute.forgers
    assert penalties(sim) == {(forger, "dissent"): 1}


def test_a_task_without_checkpoints_still_escalates_by_rounds() -> None:
    class Forged(Compute):
        def __call__(self, a: Event, key: bytes | None) -> Computed:
            out = super().__call__(a, key)
            if (a.fields["round"], a.fields["replica_index"]) == (0, 0):
                return Computed(out.output + b"forged", out.runtime_ms)
            return out

    sim = Sim(nodes=6, rules=FAST, compute=Forged(reuse=True))
    sim.submit("t0", workload="matmul", params={"n": "16"}, trust="adaptive",
               replicas=1, quorum=1)
    sim.runner.advance(150_000)
    verdict = sim.verdict("t0")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert not sim.runner.events("CheckpointRequested")
    assert all(e.fields["segment"] == -1 for e in assigned(sim))
    assert Counter(e.fields["round"] for e in assigned(sim)) == {0: 3, 1: 3}
    assert all(not e.fields["checkpoints"] for e in sim.runner.events("ResultRevealed"))


class DownAtCheckpoints:
    """The verifier, until it crashes on reading a dispute's first ``CheckpointProvided``:
    from then on what it would have read waits (``unread``)."""

    def __init__(self, inner: Verifier) -> None:
        self.inner = inner
        self.name, self.inputs, self.recovery = inner.name, inner.inputs, inner.recovery
        self.unread: list[Event] = []

    def handle(self, event: Event, ctx: Context) -> Outcome:
        if event.name == "CheckpointProvided" or self.unread:
            self.unread.append(event)
            return Outcome()
        return self.inner.handle(event, ctx)

    def tick(self, ctx: Context) -> Outcome:
        return Outcome() if self.unread else self.inner.tick(ctx)


def restarted_mid_dispute(sim: Sim) -> tuple[Verifier, list[Event], Callable[[Event], None]]:
    """Run until the verifier has asked for checkpoints and crashed on the first answer;
    rebuild it from its snapshot and journals; return it, what it did not read, and a
    way to feed it an event (read again from its committed positions)."""
    holder = next(p for p in sim.runner.processors if getattr(p, "inner", None) is sim.verifier)
    down = DownAtCheckpoints(sim.verifier)
    holder.inner = down  # type: ignore[attr-defined]
    sim.submit("t0", workload="mlp-digits", params=dict(PARAMS), trust="adaptive",
               replicas=1, quorum=1)
    sim.runner.run_until(lambda: bool(down.unread), 120_000)
    dispute = sim.verifier.disputes["t0"]
    assert dispute.pre_state is None and not dispute.referee_asked
    verifier = Verifier("verifier", rules=FAST)
    restore_full(verifier, pickle.loads(pickle.dumps(full_state(sim.verifier))))
    holder.inner = verifier  # type: ignore[attr-defined]
    index = sim.runner.processors.index(holder)

    def feed(event: Event) -> None:
        sim.runner._apply(index, holder.handle(event, sim.runner._ctx()))  # noqa: SLF001
        sim.runner.settle()

    return verifier, down.unread, feed


def test_the_verifier_restarted_mid_dispute_still_rules_for_the_honest_side() -> None:
    """The verifier is rebuilt from its snapshot (and journals) after asking for the
    checkpoints and before reading the answers: it takes them and places the referee."""
    compute = Forges({(0, 0)}, at=2)
    sim = Sim(nodes=5, rules=FAST, compute=compute)
    verifier, unread, feed = restarted_mid_dispute(sim)
    assert "t0" in verifier.disputes
    for event in unread:
        feed(event)
    sim.runner.advance(150_000)
    verdict = sim.verdict("t0")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert verdict.fields["digest"] == honest_digest()
    (forger,) = compute.forgers
    assert penalties(sim) == {(forger, "dissent"): 1}
    assert len([e for e in assigned(sim) if e.fields["segment"] >= 0]) == 1


def test_an_older_snapshot_without_disputes_restores() -> None:
    verifier = Verifier("verifier")
    state = verifier.snapshot()
    del state["disputes"]
    restored = Verifier("verifier")
    restored.restore(state)
    assert restored.disputes == {}


def test_bad_checkpoint_answers_are_dead_lettered_with_their_reason() -> None:
    compute = Forges({(0, 0)}, at=2)
    sim = Sim(nodes=5, rules=FAST, compute=compute)
    verifier, unread, feed = restarted_mid_dispute(sim)
    real = next(e for e in unread if e.name == "CheckpointProvided")
    node = real.fields["node_id"]
    other = next(n.node_id for n in sim.nodes if n.node_id not in verifier.disputes["t0"].asked)

    def signed(by: str, **fields: object) -> Event:
        body = {k: v for k, v in real.fields.items() if k != "envelope"}
        body.update(fields)
        return sign_event(new_event("CheckpointProvided", by, occurred_at=sim.runner.now_ms,
                                    **body), keys_for(by), by)

    bad = [
        (real.replace(state=real.fields["state"] + b" "), "bad-signature"),
        (signed(node, task_id="t-unknown"), "no-dispute"),
        (signed(other, node_id=other), "unexpected-checkpoint"),
        (signed(node, checkpoint=0), "unexpected-checkpoint"),
        (signed(node, state=b"not a state"), "bad-checkpoint"),
        (signed(node, state=forged_run(0).states[1]), "bad-checkpoint"),
    ]
    for event, _ in bad:
        feed(event)
    refused = {e.event_id: why for e, why in sim.runner.dead_letters}
    for event, reason in bad:
        assert refused[event.event_id].startswith(reason), (reason, refused[event.event_id])
    assert "does not hash to the agreed leaf" in refused[bad[-1][0].event_id]
    for event in unread:  # the real answers still settle it
        feed(event)
    sim.runner.advance(150_000)
    verdict = sim.verdict("t0")
    assert verdict is not None and verdict.fields["digest"] == honest_digest()


def test_the_diverge_fault_perturbs_long_training_runs_from_the_middle_only() -> None:
    """The demo's turncoat (``Fault.DIVERGE``): on a first-round mlp-digits task of 8
    segments its leaves agree up to segment 3 and differ from segment 4 on, its result is
    wrong; on a short run, an escalation round or another workload it is honest."""
    from node_runner.logic import run_assignment

    def assignment(workload: str, params: dict[str, str], round_: int = 0) -> Event:
        return new_event("TaskAssigned", "allocator", task_id="t", node_id="n", replica_index=0,
                         attempt=0, commit_deadline=1, reveal_deadline=2, workload=workload,
                         params=params, round=round_)

    honest = run_assignment(assignment("mlp-digits", PARAMS), MLP, dict(P), CPU)
    turned = run_assignment(assignment("mlp-digits", PARAMS), MLP, dict(P), CPU, Fault.DIVERGE)
    assert honest.leaves[:4] == turned.leaves[:4]
    assert all(a != b for a, b in zip(honest.leaves[4:], turned.leaves[4:], strict=True))
    assert sha256(honest.output) == honest_digest() != sha256(turned.output)
    later = run_assignment(assignment("mlp-digits", PARAMS, round_=1), MLP, dict(P), CPU,
                           Fault.DIVERGE)
    assert later.output == honest.output
    short = {**PARAMS, "epochs": "2"}
    s = MLP.validate(dict(short))
    assert run_assignment(assignment("mlp-digits", short), MLP, dict(s), CPU,
                          Fault.DIVERGE).output == MLP.run(dict(s), CPU).output


def test_a_program_whose_states_are_too_large_to_record_is_disputed_by_full_rounds() -> None:
    # wave2d on 128 x 128 float64: 256 KiB a state, past RECORDED_STATE_BYTES. Every
    # replica commits the same leaves (step and size only), so bisection finds no segment
    # to re-execute and the dispute goes to a full round, as for a task without checkpoints.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import wave2d

    from workloads.program import program_params, save_inputs, save_program

    example = wave2d.build(grid=128, steps=8)
    params = program_params(save_program(example.ep), save_inputs(example.inputs), steps=8,
                            carry=2)

    class Forged(Compute):
        def __call__(self, a: Event, key: bytes | None) -> Computed:
            out = super().__call__(a, key)
            if (a.fields["round"], a.fields["replica_index"]) == (0, 0):
                return Computed(out.output + b"forged", out.runtime_ms, out.leaves, out.states)
            return out

    sim = Sim(nodes=6, rules=FAST, compute=Forged(reuse=True))
    sim.submit("t0", workload="program", params={k: str(v) for k, v in params.items()},
               trust="adaptive", replicas=1, quorum=1)
    sim.runner.advance(150_000)
    verdict = sim.verdict("t0")
    assert verdict is not None and verdict.name == "TaskVerified"
    reveals = sim.runner.events("ResultRevealed")
    leaves = {tuple(e.fields["checkpoints"]) for e in reveals}
    assert len(leaves) == 1 and len(next(iter(leaves))) == 8, "one list of leaves for all"
    assert not sim.runner.events("CheckpointRequested")
    assert all(e.fields["segment"] == -1 for e in assigned(sim))
    assert Counter(e.fields["round"] for e in assigned(sim)) == {0: 3, 1: 3}
    forger = next(e.fields["node_id"] for e in assigned(sim)
                  if (e.fields["round"], e.fields["replica_index"]) == (0, 0))
    assert penalties(sim) == {(forger, "dissent"): 1}


def test_a_runtime_bound_claimed_as_soon_as_the_others_finished_is_dissent() -> None:
    # The sim's nodes commit as soon as they are assigned (virtual time): a replica that
    # says it was stopped at a 1.5 s bound could not have run that long. Judged.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import wave2d

    from node_runner.logic import refused
    from workloads.base import WorkRefused
    from workloads.program import program_params, save_inputs, save_program

    example = wave2d.build(grid=16, steps=4)
    params = program_params(save_program(example.ep), save_inputs(example.inputs), steps=4,
                            carry=2, max_runtime_ms=1_500)

    class Slow(Compute):
        def __call__(self, a: Event, key: bytes | None) -> Computed:
            if (a.fields["round"], a.fields["replica_index"]) == (0, 0):
                return refused(WorkRefused("runtime-bound", "stopped"), 1_500)
            return super().__call__(a, key)

    sim = Sim(nodes=6, rules=FAST, compute=Slow(reuse=True))
    sim.submit("t0", workload="program", params={k: str(v) for k, v in params.items()},
               trust="adaptive", replicas=1, quorum=1)
    sim.runner.advance(150_000)
    slow = next(e.fields["node_id"] for e in assigned(sim)
                if (e.fields["round"], e.fields["replica_index"]) == (0, 0))
    verdict = sim.verdict("t0")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert Counter(e.fields["round"] for e in assigned(sim)) == {0: 3, 1: 3}
    assert penalties(sim) == {(slow, "dissent"): 1}


def test_later_rounds_do_not_judge_a_replica_credibly_stopped_at_the_bound() -> None:
    # The rounds' bookkeeping (``_Rounds.stopped`` and ``computed``, filled from each
    # escalated round's tally) against the last round's verdict.
    from verifier.commitments import refusal_digest
    from verifier.proof_of_sync import Failed, Reason, Verified
    from verifier.service import _Rounds

    result, stopped = b"r" * 32, refusal_digest("runtime-bound")
    verifier = Verifier("verifier")
    verifier.rounds["t0"] = _Rounds(number=1, prior=[("a", result, "ref"),
                                                     ("b", stopped, None),
                                                     ("c", stopped, None)],
                                    stopped={"b"}, computed={"a"})
    _, dissent = verifier._verdict(Verified("t0", result, 2, (), "ref"))
    assert [p.node_id for p in dissent] == ["c"]  # b was stopped credibly; c was not
    failed = Failed("t0", Reason.REFUSED, "runtime-bound: 2 replicas", stopped)
    assert verifier._refused_dissent(failed) == []  # a finished in time: not judged
    other = Failed("t0", Reason.REFUSED, "bad-hash", refusal_digest("bad-hash"))
    assert sorted(p.node_id for p in verifier._refused_dissent(other)) == ["a", "b", "c"]
