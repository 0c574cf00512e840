"""Proof of Sync: commit-reveal tallies reach the honest verdict and judge the rest."""

from __future__ import annotations

import hashlib
import random

import pytest

from destra.errors import InvalidQuorum
from verifier.commitments import commitment, matches, new_salt
from verifier.proof_of_sync import (
    Contribution,
    Decision,
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

TASK = "task-7f3a"
UNITS = 40
T0 = 1_000_000
COMMIT_BY = T0 + 10_000
REVEAL_BY = T0 + 20_000
GOOD = hashlib.sha256(b"the honest output").digest()
BAD = hashlib.sha256(b"a wrong output").digest()


def salt_of(node: str) -> bytes:
    """A fixed salt per node, so tests are reproducible."""
    return hashlib.sha256(b"salt:" + node.encode()).digest()


def tally_of(*nodes: str, **kwargs: int) -> TaskTally:
    """A tally with ``nodes`` assigned to replicas 0..n-1, attempt 0."""
    tally = TaskTally(TASK, UNITS, replicas=len(nodes), quorum=kwargs.pop("quorum", 2), **kwargs)
    for index, node in enumerate(nodes):
        assert tally.on_assigned(node, index, 0, COMMIT_BY, REVEAL_BY) == []
    return tally


def commit(tally: TaskTally, node: str, digest: bytes, now: int,
           attempt: int = 0) -> list[Decision]:
    return tally.on_committed(node, attempt, commitment(TASK, node, attempt, salt_of(node), digest),
                              now)


def reveal(tally: TaskTally, node: str, digest: bytes, now: int,
           attempt: int = 0) -> list[Decision]:
    return tally.on_revealed(node, attempt, salt_of(node), digest, 1234, now,
                             result_ref=f"s3://results/{node}")


def rejection(decisions: list[Decision]) -> RejectReason:
    """The reason of the one Rejected decision in ``decisions``."""
    rejected = [d for d in decisions if isinstance(d, Rejected)]
    assert len(rejected) == 1, decisions
    return rejected[0].reason


def paid(verdict: Verified) -> dict[str, int]:
    return {c.node_id: c.compute_units for c in verdict.contributions}


# -- commitments ---------------------------------------------------------------------------


def test_a_commitment_binds_task_node_attempt_salt_and_digest() -> None:
    base = ("t", "n", 0, b"s" * 32, GOOD)
    reference = commitment(*base)
    variants = [("t2", "n", 0, b"s" * 32, GOOD), ("t", "n2", 0, b"s" * 32, GOOD),
                ("t", "n", 1, b"s" * 32, GOOD), ("t", "n", 0, b"z" * 32, GOOD),
                ("t", "n", 0, b"s" * 32, BAD)]
    assert len(reference) == 32
    assert all(commitment(*v) != reference for v in variants)
    assert matches(reference, *base) and not matches(reference, *variants[1])


def test_commitment_fields_are_length_prefixed_so_boundaries_cannot_shift() -> None:
    assert commitment("ab", "c", 0, b"s" * 16, GOOD) != commitment("a", "bc", 0, b"s" * 16, GOOD)
    assert commitment("t", "n", 0, b"ss", b"d") != commitment("t", "n", 0, b"s", b"sd")


def test_new_salts_are_32_fresh_random_bytes_and_attempts_must_fit_an_int() -> None:
    assert len(new_salt()) == 32 and new_salt() != new_salt()
    with pytest.raises(ValueError):
        commitment("t", "n", -1, b"s", GOOD)


# -- verdicts ------------------------------------------------------------------------------


def test_honest_three_of_three_is_verified_with_all_three_paid() -> None:
    tally = tally_of("a", "b", "c")
    assert commit(tally, "a", GOOD, T0 + 1) == []
    assert commit(tally, "b", GOOD, T0 + 2) == []
    assert commit(tally, "c", GOOD, T0 + 3) == [RevealOpened(TASK, T0 + 3)]
    assert reveal(tally, "a", GOOD, T0 + 4) == []
    # Quorum is reached here, but the verdict waits for c so that c is paid too.
    assert reveal(tally, "b", GOOD, T0 + 5) == []
    [verdict] = reveal(tally, "c", GOOD, T0 + 6)
    assert verdict == Verified(TASK, GOOD, 2, (
        Contribution("a", UNITS, True), Contribution("b", UNITS, True),
        Contribution("c", UNITS, True)), "s3://results/a")
    assert tally.outcome == verdict


def test_one_wrong_result_is_penalized_for_dissent_and_unpaid_while_two_agree() -> None:
    tally = tally_of("a", "b", "c")
    for node, digest in (("a", GOOD), ("b", BAD), ("c", GOOD)):
        commit(tally, node, digest, T0 + 1)
    reveal(tally, "a", GOOD, T0 + 2)
    reveal(tally, "b", BAD, T0 + 3)
    verdict, penalty = reveal(tally, "c", GOOD, T0 + 4)
    assert isinstance(verdict, Verified) and verdict.digest == GOOD
    assert paid(verdict) == {"a": UNITS, "b": 0, "c": UNITS}
    assert [c.agreed for c in verdict.contributions] == [True, False, True]
    assert penalty == Penalize("b", TASK, Reason.DISSENT)


def test_a_silent_replica_is_penalized_at_its_reveal_deadline_and_the_rest_verify() -> None:
    tally = tally_of("a", "b", "c")
    for node in "abc":
        commit(tally, node, GOOD, T0 + 1)
    reveal(tally, "a", GOOD, T0 + 2)
    reveal(tally, "b", GOOD, T0 + 3)
    assert tally.on_tick(REVEAL_BY) == []  # the deadline itself is still in time
    penalty, verdict = tally.on_tick(REVEAL_BY + 1)
    assert penalty == Penalize("c", TASK, Reason.NO_REVEAL)
    assert isinstance(verdict, Verified) and paid(verdict) == {"a": UNITS, "b": UNITS}
    assert rejection(reveal(tally, "c", GOOD, REVEAL_BY + 2)) == RejectReason.LATE_REVEAL


def test_no_show_is_penalized_and_reissued_to_a_fresh_node_then_verified() -> None:
    tally = tally_of("a", "b", "c")
    commit(tally, "a", GOOD, T0 + 1)
    commit(tally, "b", GOOD, T0 + 2)
    # c misses the commit deadline: judged, and its replica goes to someone new.
    assert tally.on_tick(COMMIT_BY + 1) == [
        Penalize("c", TASK, Reason.NO_SHOW), Reissue(TASK, 2, 1, ("a", "b", "c"))]
    # Reveals stay closed while the new replica has not committed: it could copy them.
    assert rejection(reveal(tally, "a", GOOD, COMMIT_BY + 2)) == RejectReason.REVEAL_TOO_EARLY
    assert tally.phase == "commit"
    later = COMMIT_BY + 5_000
    assert tally.on_assigned("d", 2, 1, later + 10_000, later + 20_000, now_ms=later) == []
    assert commit(tally, "d", GOOD, later + 1, attempt=1) == [RevealOpened(TASK, later + 1)]
    # a and b keep their 10 s reveal window although their own deadline has passed.
    reveal(tally, "a", GOOD, REVEAL_BY + 1)
    reveal(tally, "b", GOOD, REVEAL_BY + 2)
    [verdict] = reveal(tally, "d", GOOD, later + 3, attempt=1)
    assert isinstance(verdict, Verified) and tally.phase == "closed"
    assert paid(verdict) == {"a": UNITS, "b": UNITS, "d": UNITS}


def test_reissues_exclude_every_node_ever_used_and_a_node_never_holds_two_replicas() -> None:
    tally = tally_of("a", "b", "c")
    commit(tally, "a", GOOD, T0)
    commit(tally, "b", GOOD, T0)
    tally.on_tick(COMMIT_BY + 1)
    assert rejection(tally.on_assigned("a", 2, 1, COMMIT_BY + 9, REVEAL_BY)) \
        == RejectReason.NODE_REUSED
    tally.on_assigned("d", 2, 1, COMMIT_BY + 9, REVEAL_BY)
    [_, reissue] = tally.on_tick(COMMIT_BY + 10)
    assert reissue == Reissue(TASK, 2, 2, ("a", "b", "c", "d"))


def test_a_reissue_the_allocator_never_places_is_dropped_after_the_grace() -> None:
    tally = tally_of("a", "b", "c", reissue_grace_ms=5_000)
    commit(tally, "a", GOOD, T0)
    commit(tally, "b", GOOD, T0)
    tally.on_tick(COMMIT_BY + 1)
    assert tally.on_tick(COMMIT_BY + 5_001) == []
    assert tally.on_tick(COMMIT_BY + 5_002) == [RevealOpened(TASK, COMMIT_BY + 5_002)]
    assert rejection(tally.on_assigned("d", 2, 1, REVEAL_BY, REVEAL_BY)) \
        == RejectReason.UNEXPECTED_ASSIGNMENT


# -- faults that are rejected ---------------------------------------------------------------


def test_a_late_commit_is_rejected() -> None:
    tally = tally_of("a", "b", "c", max_attempts=0)
    assert commit(tally, "a", GOOD, COMMIT_BY) == []  # the deadline itself is in time
    decisions = commit(tally, "c", GOOD, COMMIT_BY + 1)
    assert Penalize("c", TASK, Reason.NO_SHOW) in decisions
    assert rejection(decisions) == RejectReason.LATE_COMMIT


def test_a_reveal_without_a_commitment_is_rejected() -> None:
    tally = tally_of("a", "b", "c")
    commit(tally, "a", GOOD, T0)
    assert rejection(reveal(tally, "b", GOOD, T0 + 1)) == RejectReason.REVEAL_WITHOUT_COMMITMENT
    assert rejection(reveal(tally, "stranger", GOOD, T0 + 1)) == RejectReason.NOT_ASSIGNED
    assert rejection(commit(tally, "stranger", GOOD, T0 + 1)) == RejectReason.NOT_ASSIGNED


def test_a_reveal_that_does_not_open_the_commitment_is_rejected_and_changes_nothing() -> None:
    tally = tally_of("a", "b", "c")
    for node in "abc":
        commit(tally, node, GOOD, T0)
    wrong_digest = tally.on_revealed("a", 0, salt_of("a"), BAD, 1, T0 + 1)
    wrong_salt = tally.on_revealed("a", 0, b"x" * 32, GOOD, 1, T0 + 1)
    others_salt = tally.on_revealed("a", 0, salt_of("b"), GOOD, 1, T0 + 1)
    assert {rejection(d) for d in (wrong_digest, wrong_salt, others_salt)} \
        == {RejectReason.REVEAL_MISMATCH}
    assert reveal(tally, "a", GOOD, T0 + 2) == []  # the real reveal still counts
    assert rejection(reveal(tally, "b", GOOD, T0 + 2, attempt=1)) == RejectReason.WRONG_ATTEMPT


def test_a_copy_attempt_by_committing_after_seeing_reveals_is_rejected() -> None:
    tally = tally_of("a", "b", "c", max_attempts=0)
    commit(tally, "a", GOOD, T0)
    commit(tally, "b", GOOD, T0)
    # c waits; at its deadline the commit phase closes without it.
    assert tally.on_tick(COMMIT_BY + 1) == [
        Penalize("c", TASK, Reason.NO_SHOW), RevealOpened(TASK, COMMIT_BY + 1)]
    reveal(tally, "a", GOOD, COMMIT_BY + 2)
    # c has now seen a's digest and commits to it: too late, and its reveal has no commitment.
    assert rejection(commit(tally, "c", GOOD, COMMIT_BY + 3)) == RejectReason.LATE_COMMIT
    assert rejection(reveal(tally, "c", GOOD, COMMIT_BY + 4)) \
        == RejectReason.REVEAL_WITHOUT_COMMITMENT
    [verdict] = reveal(tally, "b", GOOD, COMMIT_BY + 5)
    assert isinstance(verdict, Verified) and paid(verdict) == {"a": UNITS, "b": UNITS}


def test_a_replaced_node_cannot_commit_or_reveal_for_its_old_attempt() -> None:
    tally = tally_of("a", "b", "c")
    commit(tally, "a", GOOD, T0)
    commit(tally, "b", GOOD, T0)
    tally.on_tick(COMMIT_BY + 1)
    assert rejection(commit(tally, "c", GOOD, COMMIT_BY + 2)) == RejectReason.LATE_COMMIT
    assert rejection(reveal(tally, "c", GOOD, COMMIT_BY + 2)) \
        == RejectReason.REVEAL_WITHOUT_COMMITMENT


def test_a_second_different_commitment_is_rejected_and_the_first_stands() -> None:
    tally = tally_of("a", "b", "c")
    commit(tally, "a", GOOD, T0)
    assert rejection(commit(tally, "a", BAD, T0 + 1)) == RejectReason.CONFLICTING_COMMIT
    assert rejection(tally.on_committed("b", 0, b"short", T0)) == RejectReason.MALFORMED
    commit(tally, "b", GOOD, T0)
    commit(tally, "c", GOOD, T0)
    assert rejection(reveal(tally, "a", BAD, T0 + 2)) == RejectReason.REVEAL_MISMATCH


def test_reveals_are_rejected_until_every_assigned_replica_has_committed() -> None:
    tally = TaskTally(TASK, UNITS)
    tally.on_assigned("a", 0, 0, COMMIT_BY, REVEAL_BY)
    tally.on_assigned("b", 1, 0, COMMIT_BY, REVEAL_BY)
    commit(tally, "a", GOOD, T0)
    commit(tally, "b", GOOD, T0)
    # Replica 2 is not even assigned yet: its node must not see a digest before committing.
    assert rejection(reveal(tally, "a", GOOD, T0 + 1)) == RejectReason.REVEAL_TOO_EARLY


# -- failures ------------------------------------------------------------------------------


def test_too_many_no_shows_end_in_failed_no_quorum() -> None:
    tally = tally_of("a", "b", "c", max_attempts=3)
    commit(tally, "a", GOOD, T0)
    assert [type(d) for d in tally.on_tick(COMMIT_BY + 1)] == [Penalize] * 2 + [Reissue] * 2
    tally.on_assigned("d", 1, 1, COMMIT_BY + 100, REVEAL_BY)
    tally.on_assigned("e", 2, 1, COMMIT_BY + 100, REVEAL_BY)
    # One reissue is left: d's replica (the lower index) gets it, e's is dropped.
    *judged, reissue = tally.on_tick(COMMIT_BY + 101)
    assert [type(d) for d in judged] == [Penalize] * 2
    assert reissue == Reissue(TASK, 1, 2, ("a", "b", "c", "d", "e"))
    assert tally.reissues == 3
    tally.on_assigned("f", 1, 2, COMMIT_BY + 200, REVEAL_BY)
    decisions = tally.on_tick(COMMIT_BY + 201)
    assert decisions[0] == Penalize("f", TASK, Reason.NO_SHOW)
    assert isinstance(decisions[1], Failed) and decisions[1].reason == Reason.NO_QUORUM
    assert tally.on_tick(COMMIT_BY + 999) == []
    assert rejection(commit(tally, "a", BAD, T0)) == RejectReason.CONFLICTING_COMMIT


def test_no_replica_is_reissued_when_even_every_reissue_could_not_reach_the_quorum() -> None:
    tally = tally_of("a", "b", "c", max_attempts=1)
    penalties = [Penalize(node, TASK, Reason.NO_SHOW) for node in "abc"]
    [*judged, failed] = tally.on_tick(COMMIT_BY + 1)
    assert judged == penalties
    assert isinstance(failed, Failed) and failed.reason == Reason.NO_QUORUM


def test_a_split_vote_with_a_silent_replica_fails_without_judging_dissent() -> None:
    tally = tally_of("a", "b", "c")
    for node, digest in (("a", GOOD), ("b", BAD), ("c", GOOD)):
        commit(tally, node, digest, T0)
    reveal(tally, "a", GOOD, T0 + 1)
    reveal(tally, "b", BAD, T0 + 1)
    penalty, failed = tally.on_tick(REVEAL_BY + 1)
    assert penalty == Penalize("c", TASK, Reason.NO_REVEAL)
    assert isinstance(failed, Failed) and failed.reason == Reason.NO_QUORUM


def test_a_task_not_verified_by_its_deadline_fails() -> None:
    tally = tally_of("a", "b", "c", expires_at=T0 + 5_000)
    commit(tally, "a", GOOD, T0)
    [failed] = tally.on_tick(T0 + 5_001)
    assert isinstance(failed, Failed) and failed.reason == Reason.DEADLINE_PASSED
    assert rejection(commit(tally, "b", GOOD, T0 + 5_002)) == RejectReason.TASK_CLOSED


# -- configuration, idempotence, determinism ----------------------------------------------


@pytest.mark.parametrize(("replicas", "quorum"), [(3, 1), (4, 2), (3, 4), (2, 1), (0, 0), (16, 9)])
def test_a_quorum_that_is_not_a_majority_of_the_replicas_is_refused(replicas: int,
                                                                   quorum: int) -> None:
    with pytest.raises(InvalidQuorum):
        TaskTally(TASK, UNITS, replicas, quorum)


@pytest.mark.parametrize(("replicas", "quorum"), [(1, 1), (2, 2), (3, 2), (3, 3), (4, 3), (5, 3)])
def test_any_majority_quorum_is_accepted(replicas: int, quorum: int) -> None:
    assert TaskTally(TASK, UNITS, replicas, quorum).quorum == quorum


def test_a_three_of_five_quorum_tolerates_two_dissenters() -> None:
    tally = tally_of("a", "b", "c", "d", "e", quorum=3)
    digests = dict(zip("abcde", (GOOD, BAD, GOOD, BAD, GOOD), strict=True))
    for node, digest in digests.items():
        commit(tally, node, digest, T0)
    decisions = [d for node, digest in digests.items() for d in reveal(tally, node, digest, T0)]
    assert isinstance(decisions[0], Verified) and decisions[0].digest == GOOD
    assert decisions[1:] == [Penalize("b", TASK, Reason.DISSENT),
                             Penalize("d", TASK, Reason.DISSENT)]


Step = tuple[str, tuple[object, ...]]

SCENARIO: list[Step] = [
    ("assign", ("a", 0, 0, COMMIT_BY, REVEAL_BY)), ("assign", ("b", 1, 0, COMMIT_BY, REVEAL_BY)),
    ("assign", ("c", 2, 0, COMMIT_BY, REVEAL_BY)),
    ("commit", ("a", GOOD, T0 + 1)), ("commit", ("b", BAD, T0 + 2)),
    ("tick", (COMMIT_BY + 1,)), ("assign", ("d", 2, 1, COMMIT_BY + 9_000, REVEAL_BY + 9_000)),
    ("commit", ("d", GOOD, COMMIT_BY + 10)),
    ("reveal", ("a", GOOD, COMMIT_BY + 20)), ("reveal", ("b", BAD, COMMIT_BY + 30)),
    ("reveal", ("d", GOOD, COMMIT_BY + 40)), ("tick", (REVEAL_BY + 99_000,)),
]


def apply(tally: TaskTally, step: Step) -> list[Decision]:
    kind, args = step
    attempt = 1 if args[0] == "d" else 0
    if kind == "assign":
        return tally.on_assigned(*args)  # type: ignore[arg-type]
    if kind == "commit":
        node, digest, now = args
        return commit(tally, node, digest, now, attempt)  # type: ignore[arg-type]
    if kind == "reveal":
        node, digest, now = args
        return reveal(tally, node, digest, now, attempt)  # type: ignore[arg-type]
    return tally.on_tick(*args)  # type: ignore[arg-type]


def test_every_event_applied_twice_yields_no_new_decisions() -> None:
    tally = TaskTally(TASK, UNITS)
    decided: list[Decision] = []
    for step in SCENARIO:
        decided += apply(tally, step)
        assert apply(tally, step) == []  # redelivered at once
    assert [apply(tally, step) for step in SCENARIO] == [[]] * len(SCENARIO)  # redelivered later
    assert [type(d) for d in decided] == [Penalize, Reissue, RevealOpened, Verified, Penalize]
    assert not any(isinstance(d, Rejected) for d in decided)


def test_replaying_the_same_events_rebuilds_the_same_decisions() -> None:
    first, second = TaskTally(TASK, UNITS), TaskTally(TASK, UNITS)
    assert [apply(first, s) for s in SCENARIO] == [apply(second, s) for s in SCENARIO]
    assert first.outcome == second.outcome and first.nodes_used == ("a", "b", "c", "d")


def test_a_backdated_event_cannot_reopen_a_deadline_that_has_passed() -> None:
    tally = tally_of("a", "b", "c", max_attempts=0)
    commit(tally, "a", GOOD, T0)
    commit(tally, "b", GOOD, T0)
    tally.on_tick(COMMIT_BY + 1)
    assert rejection(commit(tally, "c", GOOD, T0)) == RejectReason.LATE_COMMIT


# -- property: the honest digest wins whenever honest replicas reach the quorum ------------


def simulate(rng: random.Random, behaviours: list[str], quorum: int,
             max_attempts: int) -> tuple[TaskTally, list[Decision], dict[str, str]]:
    """Run one task on a simulated network; reissued replicas go to honest nodes."""
    tally = TaskTally(TASK, UNITS, len(behaviours), quorum, max_attempts=max_attempts)
    role: dict[str, str] = {}
    attempts: dict[str, int] = {}
    due: list[tuple[int, int, str, str, int]] = []  # time, seq, kind, node, attempt
    decisions: list[Decision] = []

    def assign(node: str, index: int, attempt: int, now: int, behaviour: str) -> None:
        role[node], attempts[node] = behaviour, attempt
        decisions.extend(tally.on_assigned(node, index, attempt, now + 10_000, now + 20_000))
        if behaviour != "no_show":
            due.append((rng.randint(now, now + 10_000), len(due), "commit", node, attempt))

    def digest_of(node: str) -> bytes:
        shared = role[node] == "wrong"  # colluders agree on one wrong digest
        return BAD if shared else (GOOD if role[node] != "random" else rng.randbytes(32))

    def handle(new: list[Decision], now: int) -> None:
        for d in new:
            decisions.append(d)
            if isinstance(d, Reissue):
                assign(f"fresh{len(role)}", d.replica_index, d.attempt, now, "honest")
            elif isinstance(d, RevealOpened):
                for node in tally.nodes_used:
                    if role[node] in ("honest", "wrong", "random"):
                        due.append((rng.randint(now, now + 10_000), len(due), "reveal", node,
                                    attempts[node]))

    for index, behaviour in enumerate(behaviours):
        assign(f"n{index}", index, 0, T0, behaviour)
    digests: dict[str, bytes] = {}
    for now in range(T0, T0 + 300_000, 250):
        for event in sorted(e for e in due if e[0] <= now):
            due.remove(event)
            at, _, kind, node, attempt = event
            if kind == "commit":
                digests[node] = digest_of(node)
                handle(commit(tally, node, digests[node], at, attempt), at)
            else:
                handle(tally.on_revealed(node, attempt, salt_of(node), digests[node], 1, at), at)
        handle(tally.on_tick(now), now)
        if tally.outcome is not None:
            break
    return tally, decisions, role


def test_the_verdict_is_the_honest_digest_whenever_honest_replicas_reach_the_quorum() -> None:
    for seed in range(300):
        rng = random.Random(seed)
        replicas = rng.randint(1, 7)
        quorum = rng.randint(replicas // 2 + 1, replicas)
        honest = rng.randint(quorum, replicas)
        faults = [rng.choice(["wrong", "random", "no_show", "silent"])
                  for _ in range(replicas - honest)]
        behaviours = ["honest"] * honest + faults
        rng.shuffle(behaviours)
        tally, decisions, role = simulate(rng, behaviours, quorum, rng.randint(0, 3))
        context = f"seed {seed}: {behaviours} quorum {quorum}"
        assert isinstance(tally.outcome, Verified), context
        assert tally.outcome.digest == GOOD, context
        agreed = {c.node_id for c in tally.outcome.contributions if c.agreed}
        assert {n for n, r in role.items() if r == "honest"} <= agreed, context
        judged = {d.node_id for d in decisions if isinstance(d, Penalize)}
        assert all(role[n] != "honest" for n in judged), context
        assert not any(isinstance(d, Rejected) for d in decisions), context
