"""A submitter cannot frame a node by granting it a wrong data key: the signed submission
commits to the key, the node refuses a grant that misses it with a proof the verifier
checks, and the task fails ``bad_data_key``, refunded, with no node judged."""

from __future__ import annotations

import hashlib

from destra.confidential import grant
from destra.crypto import grant_key, sign_event
from destra.sim import Sim, keys_for
from ledger.book import escrow, stake
from ledger.decider import node_wallet
from schemas import Event, new_event
from schemas.bindings import data_key_commitment

STAKE = 5_000_000
PARAMS = {"count": "64", "prefix": "00ff"}


def _settled(sim: Sim, task_id: str) -> bool:
    return sim.verdict(task_id) is not None and sim.balance(escrow(task_id)) == 0


def _framed(sim: Sim) -> Event:
    sim.submit("t1", "sha256-search", PARAMS)
    sim.runner.run_until(lambda: _settled(sim, "t1"), max_ms=300_000)
    verdict = sim.verdict("t1")
    assert verdict is not None
    return verdict


def test_a_node_granted_a_key_that_misses_the_commitment_is_not_penalized() -> None:
    # Three nodes, three replicas: n0 is assigned, and alice grants it a wrong key.
    # Before the commitment, n0 computed from an input it could not open and was judged
    # (a dissenter, or a no-show): framed by the submitter.
    sim = Sim(nodes=3, frame=("n0",))
    before = sim.balance("user:alice")
    verdict = _framed(sim)
    assert (verdict.name, verdict.fields["reason"]) == ("TaskFailed", "bad_data_key")
    assert "n0" in verdict.fields["detail"]
    [refusal] = sim.runner.events("DataKeyRefused")
    assert refusal.fields["node_id"] == "n0"
    assert sim.runner.events("NodePenalized") == []
    assert sim.balance("user:alice") == before  # refunded in full
    assert sim.balance(stake("n0")) == STAKE
    assert all(sim.balance(node_wallet(f"n{i}")) == 0 for i in range(3))


def test_the_commitment_binds_task_and_key() -> None:
    key = bytes(32)
    assert data_key_commitment("t1", key) != data_key_commitment("t2", key)
    assert data_key_commitment("t1", key) != data_key_commitment("t1", bytes([1]) + key[1:])


def _verifier_with_grant(sim: Sim) -> tuple[Event, Event]:
    """A task submitted and assigned in ``sim`` (no grants sent), and a grant of a wrong
    key to n0 signed by alice."""
    sim.submit("t1", "sha256-search", PARAMS)
    sim.runner.run_until(lambda: len(sim.runner.events("TaskAssigned")) == 3, max_ms=10_000)
    a = next(e for e in sim.runner.events("TaskAssigned") if e.fields["node_id"] == "n0")
    wrong = hashlib.sha256(b"wrong").digest()
    g = sign_event(grant("alice", "t1", "n0", a.fields["attempt"], wrong,
                         keys_for("n0").encryption_public).with_envelope(
                             occurred_at=sim.runner.now_ms), keys_for("alice"), "alice")
    return a, g


def _refusal(g: Event, kek: bytes, node: str = "n0") -> Event:
    return sign_event(new_event("DataKeyRefused", node, task_id="t1", node_id="n0",
                                attempt=g.fields["attempt"], grant_id=g.event_id,
                                grant_key=kek), keys_for(node), "n0")


def test_a_refusal_the_verifier_cannot_check_is_refused_and_fails_nothing() -> None:
    sim = Sim(nodes=3, grants=False)
    _, g = _verifier_with_grant(sim)
    v = sim.verifier
    now = sim.runner.now_ms
    v.on_granted(g, now)
    right = grant_key(keys_for("n0"), g.fields["ephemeral_public_key"])
    cases = {
        "a key that does not open the grant": _refusal(g, bytes(32)),
        "signed by another node's key": _refusal(g, right, node="n1"),
    }
    for what, refusal in cases.items():
        v.rejected.clear()
        assert v.on_key_refused(refusal, now) == [], what
        assert v.rejected and v.rejected[0][2].startswith(("unproven-key-refusal",
                                                            "bad-signature")), what
    # The grant of the committed key: a node cannot claim it misses.
    v2 = Sim(nodes=3, grants=False)
    _verifier_with_grant(v2)
    good = sign_event(grant("alice", "t1", "n0", g.fields["attempt"],
                            v2.alice.data_keys["t1"], keys_for("n0").encryption_public
                            ).with_envelope(occurred_at=v2.runner.now_ms),
                      keys_for("alice"), "alice")
    v2.verifier.on_granted(good, v2.runner.now_ms)
    v2.verifier.rejected.clear()
    honest = grant_key(keys_for("n0"), good.fields["ephemeral_public_key"])
    assert v2.verifier.on_key_refused(_refusal(good, honest), v2.runner.now_ms) == []
    assert "matches the submitter's commitment" in v2.verifier.rejected[0][2]
    # The proven one fails the task, once, with no node judged.
    [failed] = v.on_key_refused(_refusal(g, right), now)
    assert (failed.name, failed.fields["reason"]) == ("TaskFailed", "bad_data_key")


def _uncommitted(sim: Sim, task_id: str, commitment: bytes = b"") -> Event:
    """Alice's sealed submission of ``task_id`` with ``commitment`` instead of hers, signed."""
    made = sim.alice.submission(task_id, "sha256-search", PARAMS, sim.runner.now_ms)
    assert made.fields["payload"] and len(made.fields["data_key_commitment"]) == 32
    return sign_event(made.replace(data_key_commitment=commitment).with_envelope(
        signature=None), keys_for("alice"), "alice")


def test_a_sealed_submission_without_a_commitment_is_refused_before_escrow() -> None:
    # Without a commitment a node granted a wrong key could not show it: the ledger, which
    # admits submissions, refuses it as it refuses other bad submissions (TaskFailed with
    # the reason, nothing escrowed, nothing placed).
    sim = Sim(nodes=3)
    before = sim.balance("user:alice")
    for task_id, commitment in (("t-none", b""), ("t-short", bytes(16))):
        sim.runner.publish(_uncommitted(sim, task_id, commitment), source="alice")
    sim.runner.run_until(lambda: len(sim.runner.events("TaskFailed")) == 2, max_ms=10_000)
    failed = {e.fields["task_id"]: e.fields for e in sim.runner.events("TaskFailed")}
    assert {t: f["reason"] for t, f in failed.items()} == {
        "t-none": "no-data-key-commitment", "t-short": "no-data-key-commitment"}
    assert "no data-key commitment" in failed["t-none"]["detail"]
    assert "16-byte" in failed["t-short"]["detail"]
    assert sim.runner.events("TaskAssigned") == []
    assert sim.balance("user:alice") == before
    assert sim.balance(escrow("t-none")) == 0 and sim.balance(escrow("t-short")) == 0
    # A sealed submission that commits, and a plain one with nothing sealed, go through.
    sim.submit("t-sealed", "sha256-search", PARAMS)
    sim.submit("t-plain")
    sim.runner.run_until(lambda: _settled(sim, "t-sealed") and _settled(sim, "t-plain"),
                         max_ms=300_000)
    for task_id in ("t-sealed", "t-plain"):
        verdict = sim.verdict(task_id)
        assert verdict is not None and verdict.name == "TaskVerified", verdict
