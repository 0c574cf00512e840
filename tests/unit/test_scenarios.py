"""Deadline scenarios on the in-memory runner: the production handlers, a virtual clock.

Each runs a whole network (ledger decider, allocator, verifier, four nodes, a
submitter) through windows of tens of virtual seconds in milliseconds of real
time.
"""

from __future__ import annotations

import pickle

from allocator.service import Allocator
from destra.crypto import KeyPair, sign_event
from destra.sim import OnVirtualClock, Sim
from ledger.book import escrow, stake
from ledger.decider import node_wallet
from node_runner.logic import Fault
from schemas import new_event
from streams.journal import full_state, restore_full
from streams.params import DEFAULTS
from verifier.proof_of_sync import Reason
from verifier.service import Verifier, slash_parameter

STAKE = 5_000_000


def _penalties(sim: Sim) -> list[tuple[str, str]]:
    return [(e.fields["node_id"], e.fields["reason"])
            for e in sim.runner.events("NodePenalized")]


def _settled(sim: Sim, task_id: str) -> bool:
    return sim.verdict(task_id) is not None and sim.balance(escrow(task_id)) == 0


def test_an_honest_network_verifies_and_pays_every_replica() -> None:
    sim = Sim()
    sim.submit("t1")
    took = sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=10_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified", verdict
    paid = [c["node_id"] for c in verdict.fields["contributions"] if c["agreed"]]
    assert len(paid) == 3 and all(sim.balance(node_wallet(n)) > 0 for n in paid)
    assert _penalties(sim) == [] and sim.runner.dead_letters == []
    assert took < 1_000  # no window had to pass


def test_a_no_show_is_reissued_to_another_node_and_penalized() -> None:
    sim = Sim(faults={"n0": Fault.NO_SHOW})
    sim.submit("t1")
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=120_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified", verdict
    assigned = [(e.fields["node_id"], e.fields["attempt"])
                for e in sim.runner.events("TaskAssigned")]
    assert ("n0", 0) in assigned and ("n3", 1) in assigned  # the lost replica, re-placed
    assert sim.runner.events("ReissueRequested")
    assert ("n0", str(Reason.NO_SHOW)) in _penalties(sim)
    assert sim.balance(stake("n0")) == STAKE - DEFAULTS[slash_parameter(Reason.NO_SHOW)]
    assert sim.balance(node_wallet("n0")) == 0


def test_a_task_nobody_grants_its_key_fails_no_data_key_refunded_and_nobody_judged() -> None:
    sim = Sim(grants=False)
    before = sim.balance("user:alice")
    sim.submit("t1", "sha256-search", {"count": "64", "prefix": "00ff"})
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=120_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskFailed"
    assert verdict.fields["reason"] == "no_data_key"
    assert sim.balance("user:alice") == before  # refunded in full
    assert _penalties(sim) == []


def test_a_granted_encrypted_task_is_verified() -> None:
    sim = Sim()
    sim.submit("t1", "sha256-search", {"count": "64", "prefix": "00ff"})
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=10_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert len(sim.runner.events("DataKeyGranted")) == 3


def test_a_late_commit_is_refused_and_the_replica_reissued() -> None:
    sim = Sim(faults={"n1": Fault.LATE})
    sim.submit("t1")
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=120_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert ("n1", str(Reason.NO_SHOW)) in _penalties(sim)
    sim.runner.advance(5_000)  # the late commit comes after the verdict: refused
    late = [reason for e, reason in sim.runner.dead_letters
            if e.name == "ResultCommitted" and e.fields["node_id"] == "n1"]
    assert late, sim.runner.dead_letters
    assert "n1" not in {c["node_id"] for c in verdict.fields["contributions"] if c["agreed"]}


def test_a_late_reveal_is_refused_and_penalized_but_the_quorum_still_verifies() -> None:
    sim = Sim(faults={"n2": Fault.LATE_REVEAL})
    sim.submit("t1")
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=120_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert ("n2", str(Reason.NO_REVEAL)) in _penalties(sim)
    sim.runner.advance(5_000)  # the late reveal arrives after the verdict
    assert any(e.name == "ResultRevealed" and e.fields["node_id"] == "n2"
               for e, _ in sim.runner.dead_letters)
    assert sim.balance(node_wallet("n2")) == 0


def test_a_dissenting_node_is_slashed_and_not_paid() -> None:
    sim = Sim(faults={"n1": Fault.WRONG_RESULT})
    sim.submit("t1")
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=10_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified"
    assert _penalties(sim) == [("n1", str(Reason.DISSENT))]
    assert sim.balance(stake("n1")) == STAKE - DEFAULTS[slash_parameter(Reason.DISSENT)]
    assert sim.balance(node_wallet("n1")) == 0
    assert all(sim.balance(node_wallet(n)) > 0 for n in ("n0", "n2"))


def test_a_copier_cannot_open_its_commitment_and_is_penalized() -> None:
    sim = Sim(faults={"n2": Fault.COPY})  # n2 is called to reveal after n0 and n1
    sim.submit("t1")
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=60_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified"
    copied = [e for e in sim.runner.events("ResultRevealed") if e.fields["node_id"] == "n2"]
    assert copied and copied[0].fields["digest"] == verdict.fields["digest"]  # it did copy
    assert any("reveal_mismatch" in reason for _, reason in sim.runner.dead_letters)
    assert ("n2", str(Reason.NO_REVEAL)) in _penalties(sim)
    assert sim.balance(node_wallet("n2")) == 0


def test_processors_restored_from_a_snapshot_mid_task_finish_it() -> None:
    # Crash the allocator and the verifier between the commits and the reveals: the
    # replacements start from the pickled snapshots alone.
    sim = Sim()
    sim.submit("t1")
    sim.submit("t2")
    sim.runner.run_until(lambda: len(sim.runner.events("ResultCommitted")) >= 1, 10_000)
    saved = pickle.dumps((full_state(sim.allocator), full_state(sim.verifier)))
    allocator = Allocator("allocator", policy=sim.allocator.policy,
                          windows=sim.allocator.windows)
    verifier = Verifier("verifier", reissue_grace_ms=sim.verifier.reissue_grace_ms)
    state_a, state_v = pickle.loads(saved)
    restore_full(allocator, state_a)
    restore_full(verifier, state_v)
    procs = list(sim.runner.processors)
    at_v = next(i for i, p in enumerate(procs) if getattr(p, "inner", None) is sim.verifier)
    procs[procs.index(sim.allocator)], procs[at_v] = allocator, OnVirtualClock(verifier)
    sim.runner.processors = procs
    sim.runner.run_until(lambda: _settled(sim, "t1") and _settled(sim, "t2"), 10_000)
    assert {sim.verdict(t).name for t in ("t1", "t2")} == {"TaskVerified"}  # type: ignore[union-attr]
    # The restored node table places a new task at once, with no new registration.
    sim.submit("t3")
    sim.runner.run_until(lambda: _settled(sim, "t3"), 10_000)
    assert sim.verdict("t3").name == "TaskVerified"  # type: ignore[union-attr]


def test_a_forged_verdict_is_refused_by_the_authority_check() -> None:
    sim = Sim()
    sim.runner.check = lambda e: (None if e.name != "TaskVerified" or e.signer == "verifier"
                                  else "unsigned-authority-event")
    sim.submit("t1")
    forged = sign_event(new_event("TaskVerified", "mallory", task_id="t1", digest=bytes(32),
                                  quorum=2, result_ref=None,
                                  contributions=[{"node_id": "n0", "compute_units": 1,
                                                  "agreed": True}]),
                        KeyPair.generate(), "mallory")
    sim.runner.publish(forged, source="mallory")
    assert (forged, "unsigned-authority-event") in sim.runner.dead_letters
    assert sim.balance(node_wallet("n0")) == 0


def test_a_node_forgets_revealed_replicas_so_its_memory_stays_bounded() -> None:
    # Found by bench/restart.py: every result ever computed stayed in memory.
    sim = Sim()
    for i in range(5):
        sim.submit(f"t{i}")
    sim.runner.run_until(lambda: all(_settled(sim, f"t{i}") for i in range(5)), 20_000)
    assert all(not n.results and not n.reveal_calls for n in sim.nodes)
    assert sum(len(n.revealed) for n in sim.nodes) == 15
    opened = sim.runner.events("RevealOpened")[0]
    node = next(n for n in sim.nodes if n.node_id == opened.fields["node_id"])
    sim.runner.publish(opened)  # a repeated reveal call is not answered twice
    assert node.reveal_calls == {}
    assert len([e for e in sim.runner.events("ResultRevealed")
                if e.fields["node_id"] == node.node_id]) == len(node.revealed)
    sim.runner.tick_ms = 60_000  # an hour in a minute's steps
    sim.runner.advance(3_700_000)
    assert all(not n.revealed for n in sim.nodes)
