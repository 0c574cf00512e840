"""The verifier's event handling: signatures against registered keys, parking, dead letters."""

from __future__ import annotations

from destra.crypto import sign_event
from schemas import Event, new_event
from schemas.samples import sample_event, with_fields
from tests.support import account_keys
from verifier.commitments import commitment
from verifier.service import Verifier

T0 = 1_800_000_000_000
NODES = ("a", "b", "c")
DIGEST = bytes(32)
SALT = bytes(range(32))


def _signed(node: str, event: Event, occurred_at: int = T0) -> Event:
    return sign_event(event.with_envelope(occurred_at=occurred_at), account_keys(node), node)


def _registered(v: Verifier) -> None:
    for n in NODES:
        keys = account_keys(n)
        v.on_registered(_signed(n, with_fields(sample_event("NodeRegistered"), node_id=n,
                                               signing_key=keys.signing_public)), T0)


def _commit(node: str, digest: bytes = DIGEST) -> Event:
    return _signed(node, new_event("ResultCommitted", node, task_id="t", node_id=node,
                                   attempt=0,
                                   commitment=commitment("t", node, 0, SALT, digest)))


def _reveal(node: str, digest: bytes = DIGEST) -> Event:
    return _signed(node, new_event("ResultRevealed", node, task_id="t", node_id=node,
                                   attempt=0, salt=SALT, digest=digest, runtime_ms=5,
                                   result_ref=None))


def _assign(v: Verifier, payload: bytes | None = None) -> None:
    for i, n in enumerate(NODES):
        v.on_assigned(new_event("TaskAssigned", "alloc", task_id="t", node_id=n,
                                replica_index=i, attempt=0, commit_deadline=T0 + 10_000,
                                reveal_deadline=T0 + 20_000, payload=payload), T0)


def _verifier() -> Verifier:
    v = Verifier("verifier")
    _registered(v)
    v.on_submitted(with_fields(sample_event("TaskSubmitted"), task_id="t", replicas=3,
                               quorum=2, compute_units=7, deadline_ms=60_000,
                               submitter_id="alice",
                               signing_key=account_keys("alice").signing_public)
                   .with_envelope(occurred_at=T0), T0)
    return v


def _grant(node: str, signer: str = "alice") -> Event:
    return sign_event(new_event("DataKeyGranted", "alice", task_id="t", node_id=node,
                                attempt=0, wrapped_key=bytes(60),
                                ephemeral_public_key=bytes(32)).with_envelope(occurred_at=T0),
                      account_keys(signer), "alice")


def test_three_honest_replicas_are_verified_after_commit_then_reveal() -> None:
    v = _verifier()
    _assign(v)
    out = [e for n in NODES for e in v.on_committed(_commit(n), T0 + 100, "w")]
    assert [(e.name, e.fields["node_id"]) for e in out] == [("RevealOpened", n) for n in NODES]
    out = [e for n in NODES for e in v.on_revealed(_reveal(n), T0 + 200, "w")]
    assert [e.name for e in out] == ["TaskVerified"]
    assert [(c["node_id"], c["compute_units"], c["agreed"])
            for c in out[0].fields["contributions"]] == [(n, 7, True) for n in NODES]
    assert v.rejected == []


def test_a_forged_commit_is_dead_lettered_as_a_bad_signature() -> None:
    v = _verifier()
    _assign(v)
    forged = sign_event(_commit("a").with_envelope(signature=None), account_keys("mallory"), "a")
    assert v.on_committed(forged, T0 + 100, "where") == []
    [(event, where, reason)] = v.rejected
    assert event is forged and where == "where" and reason.startswith("bad-signature")


def test_a_reveal_without_a_commitment_and_a_replayed_commit_are_refused() -> None:
    v = _verifier()
    _assign(v)
    v.on_committed(_commit("a"), T0 + 100, "w")
    assert v.on_committed(_commit("a"), T0 + 150, "w") == []  # same again: nothing new
    v.on_committed(_commit("a", bytes([1]) * 32), T0 + 160, "w")
    assert v.rejected.pop()[2].startswith("conflicting_commit")
    v.on_revealed(_reveal("b"), T0 + 200, "w")
    assert v.rejected.pop()[2].startswith("reveal_without_commitment")


def test_a_commit_read_before_its_assignment_waits_for_it() -> None:
    v = _verifier()
    early = _commit("a")
    assert v.on_committed(early, T0 + 50, "w") == []  # parked, not rejected
    assert v.rejected == [] and "t" in v.parked
    _assign(v)
    assert "t" not in v.parked and v.rejected == []
    v.on_committed(_commit("b"), T0 + 100, "w")
    out = v.on_committed(_commit("c"), T0 + 100, "w")
    assert {e.fields["node_id"] for e in out if e.name == "RevealOpened"} == set(NODES)


def test_a_missing_commit_is_reissued_and_the_no_show_penalized() -> None:
    v = _verifier()
    _assign(v)
    v.on_committed(_commit("a"), T0 + 100, "w")
    v.on_committed(_commit("b"), T0 + 100, "w")
    out = v.on_tick(T0 + 10_001)
    assert sorted(e.name for e in out) == ["NodePenalized", "ReissueRequested"]
    reissue = next(e for e in out if e.name == "ReissueRequested")
    assert (reissue.fields["replica_index"], reissue.fields["attempt"]) == (2, 1)
    assert sorted(reissue.fields["exclude_node_ids"]) == list(NODES)


def test_a_replayed_commit_and_a_replayed_reveal_are_dead_lettered() -> None:
    v = _verifier()
    _assign(v)
    commit = _commit("a")
    v.on_committed(commit, T0 + 100, "w")
    assert v.on_committed(commit, T0 + 150, "w") == []
    assert v.rejected.pop()[2].startswith("replayed-event: ResultCommitted")
    for n in ("b", "c"):
        v.on_committed(_commit(n), T0 + 200, "w")
    reveal = _reveal("a")
    v.on_revealed(reveal, T0 + 300, "w")
    assert v.on_revealed(reveal, T0 + 350, "w") == []
    assert v.rejected.pop()[2].startswith("replayed-event: ResultRevealed")
    assert v.rejected == []


def test_stale_and_future_events_are_dead_lettered_as_expired() -> None:
    v = _verifier()
    _assign(v)
    stale = _signed("a", _commit("a"), occurred_at=T0 - 301_000)
    assert v.on_committed(stale, T0 + 100, "w") == []
    assert "occurred 301100 ms before it was read" in v.rejected.pop()[2]
    future = _signed("b", _commit("b"), occurred_at=T0 + 120_000)
    assert v.on_committed(future, T0 + 100, "w") == []
    assert v.rejected.pop()[2].startswith("expired-event: ResultCommitted claims to occur")
    fresh = _signed("a", _commit("a"), occurred_at=T0 + 50)
    v.on_committed(fresh, T0 + 100, "w")
    assert v.rejected == []


def test_a_commit_signed_with_another_nodes_key_and_a_key_takeover_are_refused() -> None:
    v = _verifier()
    _assign(v)
    wrong = sign_event(_commit("a").with_envelope(signature=None), account_keys("b"), "a")
    v.on_committed(wrong, T0 + 100, "w")
    assert v.rejected.pop()[2].startswith("bad-signature: ResultCommitted not signed by "
                                          "the registered key of a")
    # Mallory registers node "a" again, with her own (validly self-signed) key: refused.
    mallory = account_keys("mallory")
    takeover = sign_event(with_fields(sample_event("NodeRegistered"), node_id="a",
                                      signing_key=mallory.signing_public), mallory, "a")
    v.on_registered(takeover, T0 + 200, "w")
    assert v.rejected.pop()[2] == "wrong-key: a is registered with another signing key"
    assert v.keys["a"] == account_keys("a").signing_public


def test_an_encrypted_replica_never_granted_fails_the_task_no_data_key_without_penalty() -> None:
    v = _verifier()
    _assign(v, payload=b"sealed input")
    v.on_granted(_grant("a"), T0 + 10, "w")
    v.on_granted(_grant("b", signer="mallory"), T0 + 10, "w")  # forged: does not count
    assert v.rejected.pop()[2].startswith("bad-signature: grant for t not signed by its "
                                          "submitter alice")
    v.on_committed(_commit("a"), T0 + 100, "w")
    out = v.on_tick(T0 + 10_001)
    assert [(e.name, e.fields["reason"]) for e in out] == [("TaskFailed", "no_data_key")]
    assert "did not grant the data key to b" in out[0].fields["detail"]
    assert v.on_tick(T0 + 20_000) == []  # decided once; no NodePenalized for anyone


def test_granted_replicas_of_an_encrypted_task_are_judged_as_usual() -> None:
    v = _verifier()
    _assign(v, payload=b"sealed input")
    for n in NODES:
        v.on_granted(_grant(n), T0 + 10, "w")
    assert v.ungranted == {}
    v.on_committed(_commit("a"), T0 + 100, "w")
    v.on_committed(_commit("b"), T0 + 100, "w")
    out = v.on_tick(T0 + 10_001)
    assert sorted(e.name for e in out) == ["NodePenalized", "ReissueRequested"]


def test_the_terms_of_a_task_never_assigned_are_forgotten_after_its_deadline() -> None:
    """A task the ledger or the allocator failed opens no tally: its terms must still go."""
    v = _verifier()  # task "t": submitted at T0, deadline 60 s, never assigned
    v.on_tick(T0 + 60_000 + v.forget_after_ms)
    assert "t" in v.terms  # not yet past deadline + forget_after_ms
    v.on_tick(T0 + 60_000 + v.forget_after_ms + v.park_ms + 1)
    assert "t" not in v.terms


def test_an_open_task_keeps_its_terms_and_a_closed_one_only_its_closed_mark() -> None:
    v = _verifier()
    _assign(v)
    v.on_tick(T0 + 59_000)  # open: nobody committed yet, the deadline is ahead
    assert "t" in v.terms and "t" in v.tallies
    v.on_tick(T0 + 60_001)  # the deadline passed: a verdict, and the state goes
    assert "t" not in v.terms and "t" not in v.tallies and "t" in v.closed
    v.on_committed(_commit("a"), T0 + 60_002, "w")  # a late commit is refused at once
    assert v.rejected and v.rejected[-1][2].startswith("task_closed")
    v.on_granted(_grant("a"), T0 + 60_003, "w")  # and a late (or replayed) grant, saying so
    assert len(v.rejected) == 2 and v.rejected[-1][2].startswith("task_closed: t has")


def test_a_reveal_phase_opened_from_a_backlog_gives_voters_their_whole_window() -> None:
    # Found by the chaos test: a worker restarting behind its commits opened the reveal
    # phase at the commits' time, so every reveal was late and the task failed no_quorum.
    from streams.processing import Context

    v = _verifier()
    _assign(v)  # commit deadline T0 + 10 s, reveal deadline T0 + 20 s: a 10 s window
    late = T0 + 25_000  # read 25 s after they were appended
    out = []
    for n in NODES:
        out += v.handle(_commit(n), Context(T0 + 100, wall_ms=late)).emit
    opened = [e for e in out if e.name == "RevealOpened"]
    assert len(opened) == 3
    assert all(e.fields["reveal_deadline"] >= late + 10_000 for e in opened)
    reveals = [v.handle(_reveal(n), Context(late + 500, wall_ms=late + 500)) for n in NODES]
    assert [e.name for r in reveals for e in r.emit] == ["TaskVerified"]
