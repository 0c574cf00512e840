"""Refusals travel like results (issue 15): a task its workload refuses identically on every
honest node fails ``refused``, refunded in full, nobody penalized but dissenters; a lying
refuser is a dissenter; a refusal that does not hash to its digest is refused; a tamperer
is caught; a task homogeneous by its parameters runs on one device class.

The workload here is test-only (``tests.refusing.Refuser``): registered for one test by
patching the registry (``workloads.WORKLOADS``, which ``get_workload`` reads), never in
the production one.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator

import pytest

import workloads
from destra.confidential import open_result
from destra.sim import CPU, Sim, keys_for
from ledger.book import escrow, stake
from ledger.decider import node_wallet
from node_runner.logic import Computed, Fault, refused, run_assignment, tampered
from schemas import Event, new_event
from streams.params import DEFAULTS
from tests.refusing import Refuser, with_refuser
from verifier.commitments import commitment, refusal_code, refusal_digest
from verifier.proof_of_sync import (
    Failed,
    Penalize,
    Reason,
    Rejected,
    RejectReason,
    TaskTally,
    Verified,
)
from verifier.service import slash_parameter
from workloads.base import WorkRefused
from workloads.canonical import canonical_json, sha256

STAKE = 5_000_000


@pytest.fixture
def refuser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Refuser]:
    w = Refuser()
    monkeypatch.setattr(workloads, "WORKLOADS", with_refuser(workloads.WORKLOADS))
    yield w


def _penalties(sim: Sim) -> list[tuple[str, str]]:
    return [(e.fields["node_id"], e.fields["reason"])
            for e in sim.runner.events("NodePenalized")]


def _settled(sim: Sim, task_id: str) -> bool:
    return sim.verdict(task_id) is not None and sim.balance(escrow(task_id)) == 0


def _entries(sim: Sim, transaction_id: str) -> list[tuple[str, int, str]]:
    return [(e.fields["account"], e.fields["amount_micro"], e.fields["kind"])
            for e in sim.runner.events("LedgerEntryPosted")
            if e.fields["transaction_id"] == transaction_id]


def _escrowed(sim: Sim, task_id: str) -> int:
    return sum(amount for e in sim.runner.events("LedgerEntryPosted")
               if e.fields["account"] == escrow(task_id) and e.fields["kind"] == "escrow"
               for amount in [e.fields["amount_micro"]])


def test_a_task_every_replica_refuses_fails_refused_refunded_in_full_and_nobody_judged(
        refuser: Refuser) -> None:
    sim = Sim()
    before = sim.balance("user:alice")
    sim.submit("t1", "refuser", {"units": "5", "refuse": "disallowed-op"})
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=60_000)
    # Every replica committed and revealed its refusal, code in the clear.
    reveals = sim.runner.events("ResultRevealed")
    assert len(reveals) == 3
    assert {(e.fields["refusal"], e.fields["digest"]) for e in reveals} == {
        ("disallowed-op", refusal_digest("disallowed-op"))}
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskFailed"
    assert verdict.fields["reason"] == "refused"
    assert verdict.fields["detail"].startswith("disallowed-op: ")
    # The whole escrow goes back, through the refund every failure takes.
    escrowed = _escrowed(sim, "t1")
    assert escrowed > 0
    assert sorted(_entries(sim, "refund/t1")) == sorted(
        [(escrow("t1"), -escrowed, "refund"), ("user:alice", escrowed, "refund")])
    assert sim.balance("user:alice") == before
    assert _penalties(sim) == [] and sim.runner.events("TaskVerified") == []
    assert all(sim.balance(node_wallet(n.node_id)) == 0 for n in sim.nodes)
    assert all(sim.balance(stake(n.node_id)) == STAKE for n in sim.nodes)
    assert sim.runner.dead_letters == []


def test_the_submitter_can_open_the_refusal_detail_sealed_to_it(refuser: Refuser) -> None:
    sim = Sim()
    sim.submit("t1", "refuser", {"refuse": "disallowed-op"})
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=60_000)
    reveal = sim.runner.events("ResultRevealed")[0].fields
    document = open_result((keys_for("alice"),), "t1", reveal["node_id"], reveal["attempt"],
                           reveal["result"])
    assert document == canonical_json({"refused": "disallowed-op",
                                       "detail": "op aten.foo is not on the allowed list"})


def _lying(a: Event, data_key: bytes | None) -> Computed:
    return refused(WorkRefused("disallowed-op", "a lie"))


def test_a_node_that_refuses_what_the_others_compute_is_the_dissenter_and_is_judged(
        refuser: Refuser) -> None:
    sim = Sim(nodes=3)  # every node runs a replica
    sim.nodes[1].compute = _lying
    sim.submit("t1", "refuser", {"units": "5"})
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=60_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified", verdict
    agreed = {c["node_id"]: c["agreed"] for c in verdict.fields["contributions"]}
    assert agreed == {"n0": True, "n1": False, "n2": True}
    assert _penalties(sim) == [("n1", str(Reason.DISSENT))]
    assert sim.balance(stake("n1")) == STAKE - DEFAULTS[slash_parameter(Reason.DISSENT)]
    assert sim.balance(node_wallet("n1")) == 0
    assert all(sim.balance(node_wallet(n)) > 0 for n in ("n0", "n2"))


def test_a_node_that_computes_what_a_quorum_refuses_is_the_dissenter_and_the_task_refunded(
        refuser: Refuser) -> None:
    sim = Sim(nodes=3)
    for n in (sim.nodes[0], sim.nodes[2]):
        n.compute = _lying  # two agree on the refusal: it is the quorum's
    before = sim.balance("user:alice")
    sim.submit("t1", "refuser", {"units": "5"})
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=60_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.fields["reason"] == "refused"
    assert _penalties(sim) == [("n1", str(Reason.DISSENT))]
    assert sim.balance("user:alice") == before
    assert all(sim.balance(node_wallet(n.node_id)) == 0 for n in sim.nodes)


def _mislabelled(a: Event, data_key: bytes | None) -> Computed:
    """A result's digest revealed with a refusal code: the two contradict each other."""
    return Computed(canonical_json({"seed": 0, "units": 5}), 1, refusal="disallowed-op")


def test_a_reveal_whose_refusal_does_not_hash_to_its_digest_is_refused(
        refuser: Refuser) -> None:
    sim = Sim(nodes=3)
    sim.nodes[1].compute = _mislabelled
    sim.submit("t1", "refuser", {"units": "5"})
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=120_000)
    refused_reveals = [reason for e, reason in sim.runner.dead_letters
                       if e.name == "ResultRevealed" and e.fields["node_id"] == "n1"]
    assert refused_reveals and refused_reveals[0].startswith("refusal_mismatch")
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert ("n1", str(Reason.NO_REVEAL)) in _penalties(sim)  # its only reveal did not count


def test_the_tally_rejects_a_refusal_that_contradicts_the_digest_and_accepts_a_true_one(
        ) -> None:
    tally = TaskTally("t1", 5, replicas=3, quorum=2)
    digest = sha256(b"an output")
    salts = {n: bytes([i]) * 32 for i, n in enumerate(("a", "b", "c"))}
    for i, n in enumerate(("a", "b", "c")):
        tally.on_assigned(n, i, 0, 1_000, 2_000, now_ms=0)
    for n in ("a", "b"):
        tally.on_committed(n, 0, commitment("t1", n, 0, salts[n], refusal_digest("bad-hash")),
                           10)
    tally.on_committed("c", 0, commitment("t1", "c", 0, salts["c"], digest), 10)
    # A code that does not hash to the digest; then a code that is no code at all.
    lie = tally.on_revealed("c", 0, salts["c"], digest, 1, 20, refusal="bad-hash")
    assert [(type(d), d.reason) for d in lie if isinstance(d, Rejected)] == [
        (Rejected, RejectReason.REFUSAL_MISMATCH)]
    assert tally.on_revealed("a", 0, salts["a"], refusal_digest("bad-hash"), 1, 20,
                             refusal="Bad Hash!")[-1].reason == RejectReason.REFUSAL_MISMATCH
    # The true reveals count: the quorum's refusal fails the task; "c" dissented.
    assert tally.on_revealed("c", 0, salts["c"], digest, 1, 21) == []
    tally.on_revealed("a", 0, salts["a"], refusal_digest("bad-hash"), 1, 22,
                      refusal="bad-hash")
    out = tally.on_revealed("b", 0, salts["b"], refusal_digest("bad-hash"), 1, 23,
                            refusal="bad-hash")
    failed = out[0]
    assert isinstance(failed, Failed) and failed.detail.startswith("bad-hash: ")
    assert out == [Failed("t1", Reason.REFUSED, failed.detail, refusal_digest("bad-hash")),
                   Penalize("c", "t1", Reason.DISSENT)]


def test_a_quorum_on_a_refusal_digest_whose_reveals_carry_no_code_is_an_ordinary_verdict(
        ) -> None:
    # Nothing proves the digest a refusal: it is judged as a result (no refund path taken).
    tally = TaskTally("t1", 5, replicas=1, quorum=1)
    tally.on_assigned("a", 0, 0, 1_000, 2_000, now_ms=0)
    salt = bytes(32)
    tally.on_committed("a", 0, commitment("t1", "a", 0, salt, refusal_digest("x")), 10)
    out = tally.on_revealed("a", 0, salt, refusal_digest("x"), 1, 20)
    assert [type(d).__name__ for d in out] == ["Verified"]


def test_a_badly_named_refusal_code_is_replaced_identically_everywhere() -> None:
    assert refusal_code("shape-mismatch") == "shape-mismatch"
    odd = refusal_code("Shape Mismatch!")
    assert odd == refusal_code("Shape Mismatch!") and odd.startswith("invalid-code-")
    assert refused(WorkRefused("Shape Mismatch!", "d")).refusal == odd


def test_a_tamperer_of_a_programs_bytes_is_caught_by_its_hash_and_slashed(
        refuser: Refuser) -> None:
    program = b"\x00torch.export program bytes" * 8
    params = {"program_sha256": hashlib.sha256(program).hexdigest(),
              "program": base64.b64encode(program).decode()}
    sim = Sim(nodes=3, faults={"n2": Fault.TAMPER_INPUT})
    sim.submit("t1", "refuser", params)
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=60_000)
    tamperer = [e.fields for e in sim.runner.events("ResultRevealed")
                if e.fields["node_id"] == "n2"]
    assert tamperer and tamperer[0]["refusal"] == "bad-hash"  # its own copy failed the hash
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert _penalties(sim) == [("n2", str(Reason.DISSENT))]
    assert sim.balance(stake("n2")) == STAKE - DEFAULTS[slash_parameter(Reason.DISSENT)]


def test_a_tamperer_of_an_ordinary_workloads_input_is_outvoted_and_slashed() -> None:
    sim = Sim(nodes=3, faults={"n0": Fault.TAMPER_INPUT})
    sim.submit("t1", "heat2d", {"grid": "8", "steps": "1", "seed": "7"})
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=60_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified"
    agreed = {c["node_id"]: c["agreed"] for c in verdict.fields["contributions"]}
    assert agreed == {"n0": False, "n1": True, "n2": True}
    assert _penalties(sim) == [("n0", str(Reason.DISSENT))]


def test_tampering_flips_a_program_byte_else_moves_the_seed(refuser: Refuser) -> None:
    program = base64.b64encode(b"abcd").decode()
    flipped = tampered(refuser, {"program": program, "seed": 3})
    assert base64.b64decode(flipped["program"]) == b"abbd" and flipped["seed"] == 3
    assert tampered(refuser, {"program": b"abcd"})["program"] == b"abbd"
    assert tampered(refuser, {"program": "", "seed": 3})["seed"] == 4
    assert tampered(refuser, {"seed": 2**31 - 1})["seed"] == 2**31 - 2
    # run_assignment refuses the tampered program with the workload's own check.
    parsed = refuser.validate({"program_sha256": hashlib.sha256(b"abcd").hexdigest(),
                               "program": program})
    assignment = new_event("TaskAssigned", "allocator", task_id="t", node_id="n",
                           replica_index=0, attempt=0, commit_deadline=1, reveal_deadline=2,
                           workload="refuser")
    assert run_assignment(assignment, refuser, parsed, CPU).refusal is None
    assert run_assignment(assignment, refuser, parsed, CPU,
                          Fault.TAMPER_INPUT).refusal == "bad-hash"


def test_a_task_homogeneous_by_its_parameters_is_placed_on_one_device_class(
        refuser: Refuser) -> None:
    classes = {"n0": "cuda-sm80", "n1": "cuda-sm90", "n2": "cuda-sm90", "n3": "cuda-sm90",
               "n4": "cuda-sm80"}
    sim = Sim(nodes=5, device_classes=classes)
    sim.submit("exact", "refuser", {"exact": "1"})
    # The submitter cannot waive the workload's rule: the allocator applies it anyway.
    sim.submit("waived", "refuser", {"exact": "1", "seed": "1"}, homogeneous=False)
    sim.runner.run_until(lambda: _settled(sim, "exact") and _settled(sim, "waived"),
                         max_ms=60_000)
    for task_id in ("exact", "waived"):
        placed = {classes[e.fields["node_id"]] for e in sim.runner.events("TaskAssigned")
                  if e.fields["task_id"] == task_id}
        assert placed == {"cuda-sm90"}, (task_id, placed)
        verdict = sim.verdict(task_id)
        assert verdict is not None and verdict.name == "TaskVerified"
    submitted = {e.fields["task_id"]: e.fields["homogeneous"]
                 for e in sim.runner.events("TaskSubmitted")}
    assert submitted == {"exact": True, "waived": False}  # the client's default: the rule's


def test_an_adaptive_task_whose_later_round_refuses_judges_the_earlier_computer(
        refuser: Refuser) -> None:
    honest = Sim().nodes[0].compute  # the production computation of the simulation

    def compute(a: Event, data_key: bytes | None) -> Computed:
        # Round 0's first replica computes; every other replica refuses.
        if a.fields["round"] == 0 and a.fields["replica_index"] == 0:
            return honest(a, data_key)
        return _lying(a, data_key)

    sim = Sim(nodes=7, compute=compute)
    before = sim.balance("user:alice")
    sim.submit("t1", "refuser", {"units": "5"}, trust="adaptive", replicas=1, quorum=1)
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=300_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.fields["reason"] == "refused", verdict
    rounds = {e.fields["round"] for e in sim.runner.events("TaskAssigned")}
    assert rounds == {0, 1}  # the disagreement escalated; the next round refused
    computer = next(e.fields["node_id"] for e in sim.runner.events("TaskAssigned")
                    if e.fields["round"] == 0 and e.fields["replica_index"] == 0)
    assert _penalties(sim) == [(computer, str(Reason.DISSENT))]
    assert sim.balance("user:alice") == before
    assert all(sim.balance(node_wallet(n.node_id)) == 0 for n in sim.nodes)


def test_destra_audit_rederives_a_refused_task_and_a_waived_homogeneity_without_discrepancy(
        refuser: Refuser) -> None:
    from ledger.audit import audit
    from tests.unit.test_audit import GENESIS, records

    classes = {"n0": "cuda-sm80", "n1": "cuda-sm90", "n2": "cuda-sm90", "n3": "cuda-sm90",
               "n4": "cuda-sm80"}
    sim = Sim(nodes=5, device_classes=classes)
    sim.submit("refused", "refuser", {"refuse": "disallowed-op"})
    sim.submit("waived", "refuser", {"exact": "1", "seed": "1"}, homogeneous=False)
    sim.runner.run_until(lambda: _settled(sim, "refused") and _settled(sim, "waived"),
                         max_ms=120_000)
    sim.runner.advance(5_000)  # let the ledger settle, the penalties post
    assert sim.verdict("refused").fields["reason"] == "refused"  # type: ignore[union-attr]
    log = records(sim)
    report = audit(log, GENESIS)
    assert report.ok, [str(d) for d in report.discrepancies]
    assert report.checked["verdicts"] == report.checked["verdicts_rederived"] == 1
    # The refusal is re-derived, not taken on trust: without it, it is named missing.
    cut = [r for r in log if not (r.event.name == "TaskFailed"
                                  and r.event.fields["task_id"] == "refused")]
    missing = audit(cut, GENESIS)
    assert not missing.ok
    assert any("refused" in str(d) for d in missing.discrepancies), [
        str(d) for d in missing.discrepancies]


def test_a_private_input_out_of_bounds_is_refused_invalid_input_and_refunded() -> None:
    # The public parameters passed the ledger and the allocator; the sealed seed only the
    # nodes see is out of its bounds: every replica refuses it alike, nobody is paid.
    sim = Sim()
    before = sim.balance("user:alice")
    sim.submit("t1", "matmul", {"n": "16", "seed": "-3"})
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=60_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskFailed", verdict
    assert verdict.fields["reason"] == "refused"
    assert verdict.fields["detail"].startswith("invalid-input")
    assert {e.fields["refusal"] for e in sim.runner.events("ResultRevealed")} == {
        "invalid-input"}
    reveal = sim.runner.events("ResultRevealed")[0].fields
    document = open_result((keys_for("alice"),), "t1", reveal["node_id"], reveal["attempt"],
                           reveal["result"])
    assert b"'seed'" in document and b"out of range" in document
    assert sim.balance("user:alice") == before
    assert _penalties(sim) == []


# ------------------------------------------------------------------ stopped at the bound

BOUND_MS = 5_000
STOPPED = refusal_digest("runtime-bound")


def bounded_tally(bound_ms: int = BOUND_MS) -> tuple[TaskTally, dict[str, bytes]]:
    """Three replicas of a task with a wall-clock bound, assigned at t = 0."""
    tally = TaskTally("t1", 10, replicas=3, quorum=2, runtime_bound_ms=bound_ms)
    for i, n in enumerate("abc"):
        tally.on_assigned(n, i, 0, 60_000, 90_000, now_ms=0)
    return tally, {n: bytes([i]) * 32 for i, n in enumerate("abc")}


def settle(tally: TaskTally, salts: dict[str, bytes],
           answers: dict[str, tuple[bytes, str | None, int]]) -> list[object]:
    """Each node commits its digest at its time, then all reveal: the decisions."""
    for n, (digest, _, at) in answers.items():
        tally.on_committed(n, 0, commitment("t1", n, 0, salts[n], digest), at)
    out: list[object] = []
    for n, (digest, code, _) in answers.items():
        out += tally.on_revealed(n, 0, salts[n], digest, 1, 30_000, refusal=code)
    return out


def test_a_node_stopped_at_the_bound_is_not_judged_against_faster_nodes_that_finished(
        ) -> None:
    result = hashlib.sha256(b"finished").digest()
    tally, salts = bounded_tally()
    out = settle(tally, salts, {"a": (result, None, 2_000), "b": (result, None, 3_000),
                                "c": (STOPPED, "runtime-bound", BOUND_MS + 200)})
    (verdict,) = [d for d in out if isinstance(d, Verified)]
    assert verdict.digest == result
    assert {c.node_id: c.compute_units for c in verdict.contributions} == {
        "a": 10, "b": 10, "c": 0}  # not paid for what it did not deliver
    assert not [d for d in out if isinstance(d, Penalize)]
    # What an adaptive task's later rounds are told (``_Rounds.stopped``, ``computed``).
    assert tally.stopped_at_bound() == ({"c"}, {"a", "b"})


def test_a_runtime_bound_claimed_before_the_bound_could_pass_is_dissent() -> None:
    result = hashlib.sha256(b"finished").digest()
    tally, salts = bounded_tally()
    out = settle(tally, salts, {"a": (result, None, 2_000), "b": (result, None, 3_000),
                                "c": (STOPPED, "runtime-bound", 1_000)})
    assert [(d.node_id, d.reason) for d in out if isinstance(d, Penalize)] == [
        ("c", Reason.DISSENT)]
    # And on a task without a bound, nothing excuses it either.
    tally, salts = bounded_tally(0)
    out = settle(tally, salts, {"a": (result, None, 2_000), "b": (result, None, 3_000),
                                "c": (STOPPED, "runtime-bound", BOUND_MS + 200)})
    assert [d.node_id for d in out if isinstance(d, Penalize)] == ["c"]


def test_a_node_that_finished_is_not_judged_when_a_quorum_was_stopped_at_the_bound() -> None:
    result = hashlib.sha256(b"finished").digest()
    tally, salts = bounded_tally()
    out = settle(tally, salts, {"a": (result, None, 4_000),
                                "b": (STOPPED, "runtime-bound", BOUND_MS + 100),
                                "c": (STOPPED, "runtime-bound", BOUND_MS + 300)})
    (failed,) = [d for d in out if isinstance(d, Failed)]
    assert failed.reason == Reason.REFUSED and failed.detail.startswith("runtime-bound")
    assert not [d for d in out if isinstance(d, Penalize)]
    # Another refusal against that quorum is still dissent.
    tally, salts = bounded_tally()
    out = settle(tally, salts, {"a": (refusal_digest("bad-hash"), "bad-hash", 1_000),
                                "b": (STOPPED, "runtime-bound", BOUND_MS + 100),
                                "c": (STOPPED, "runtime-bound", BOUND_MS + 300)})
    assert [d.node_id for d in out if isinstance(d, Penalize)] == ["a"]


def test_the_verifier_takes_a_programs_bound_from_its_public_parameters() -> None:
    from verifier.service import Verifier, _Terms
    from workloads.program import PROGRAM

    params = {"program_sha256": "ab" * 32, "input_sha256": "cd" * 32, "units": "1200",
              "memory_mb": "96", "steps": "2", "carry": "0", "mantissa_bits": "0",
              "max_runtime_ms": "4500"}

    def terms(workload: str, public: dict[str, str]) -> _Terms:
        return _Terms(1200, 3, 2, 10**12, "alice", b"k" * 32, workload=workload,
                      params=tuple(sorted(public.items())))

    verifier = Verifier("verifier")
    assert verifier._wall_bound(terms("program", params)) == 4500
    rule = {**params, "max_runtime_ms": "0"}  # the rule's: 10 s + units / 10 per ms
    assert verifier._wall_bound(terms("program", rule)) == 10_000 + 120
    assert PROGRAM.wall_bound_ms(PROGRAM.validate(rule)) == 10_120
    assert verifier._wall_bound(terms("heat2d", {"grid": "8", "steps": "1"})) == 0
    assert verifier._wall_bound(terms("program", {**params, "units": "x"})) == 0
