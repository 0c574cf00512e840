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


def _assign(v: Verifier) -> None:
    for i, n in enumerate(NODES):
        v.on_assigned(new_event("TaskAssigned", "alloc", task_id="t", node_id=n,
                                replica_index=i, attempt=0, commit_deadline=T0 + 10_000,
                                reveal_deadline=T0 + 20_000), T0)


def _verifier() -> Verifier:
    v = Verifier("verifier")
    _registered(v)
    v.on_submitted(with_fields(sample_event("TaskSubmitted"), task_id="t", replicas=3,
                               quorum=2, compute_units=7, deadline_ms=60_000)
                   .with_envelope(occurred_at=T0), T0)
    return v


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
