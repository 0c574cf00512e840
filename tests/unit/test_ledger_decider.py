"""The ledger's decisions on domain events: escrow or a reasoned rejection, pay once."""

from __future__ import annotations

from allocator.pricing import PriceBook, Tier
from destra.crypto import sign_event
from ledger.book import TREASURY, escrow, stake, user
from ledger.decider import LedgerDecider, node_wallet
from schemas import Event, new_event
from schemas.bindings import sign_stake_consent
from schemas.samples import sample_event, with_fields
from tests.support import account_keys, registration, signed_submission

T0 = 1_800_000_000_000


REGISTERED = ("alice", "bob", "carol", "op")
"""The accounts the tests' ledgers start with, registered to their ``account_keys``."""


def _decider() -> LedgerDecider:
    """A ledger whose network price is 1 micro-token a unit in every tier, with the
    ``REGISTERED`` accounts."""
    d = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))
    for name in REGISTERED:
        assert d.judge(registration(name)).rejected == []
    return d


def _submit(task_id: str, price: int, *, who: str = "alice", expires: int = T0 + 60_000,
            max_price: int | None = None) -> Event:
    e = with_fields(sample_event("TaskSubmitted"), task_id=task_id, submitter_id=who,
                    quoted_price_micro=price, max_price_micro=max_price or price,
                    quote_expires_at=expires, compute_units=100, replicas=3, quorum=2)
    return signed_submission(e.with_envelope(occurred_at=T0))


def _verified(task_id: str, agreed: list[str], dissent: list[str] = ()) -> Event:  # type: ignore[assignment]
    contributions = [{"node_id": n, "compute_units": 100, "agreed": True} for n in agreed]
    contributions += [{"node_id": n, "compute_units": 100, "agreed": False} for n in dissent]
    return with_fields(sample_event("TaskVerified"), task_id=task_id,
                       contributions=contributions)


def _mint(account: str, amount: int) -> Event:
    return new_event("TokensMinted", "faucet", account=account, amount_micro=amount,
                     reason="test")


def _entries(events: list[Event]) -> list[tuple[str, int, str]]:
    return [(e.fields["account"], e.fields["amount_micro"], e.fields["kind"]) for e in events]


def test_a_funded_submission_is_escrowed_and_verification_pays_agreeing_nodes_only() -> None:
    d = _decider()
    d.decide(_mint("alice", 1_000_000))
    assert _entries(d.decide(_submit("t1", 300_000))) == [
        (user("alice"), -300_000, "escrow"), (escrow("t1"), 300_000, "escrow")]
    d.decide(_verified("t1", ["n1", "n2"], dissent=["cheat"]))
    assert d.book.balance(node_wallet("n1")) == d.book.balance(node_wallet("n2")) == 95_000
    assert d.book.balance(node_wallet("cheat")) == 0
    assert d.book.balance(TREASURY) == 10_000
    assert d.book.balance(user("alice")) == 800_000  # the dissenter's third came back
    assert d.book.total() == 0


def test_a_second_verdict_for_the_same_task_pays_nothing() -> None:
    d = _decider()
    d.decide(_mint("alice", 1_000_000))
    d.decide(_submit("t1", 300_000))
    assert d.decide(_verified("t1", ["n1", "n2", "n3"]))
    assert d.decide(_verified("t1", ["n1", "n2", "n3"])) == []
    assert d.book.balance(node_wallet("n1")) == 95_000


def test_rejections_carry_their_reason_and_move_no_money() -> None:
    d = _decider()
    d.decide(_mint("bob", 100_000))
    # The network price is 100 units x 3 replicas x 1 micro-token = 300.
    forged = _submit("t-forged", 40_000, who="bob").replace(quoted_price_micro=30_000)
    mallory = account_keys("mallory")
    stolen = sign_event(_submit("t-stolen", 40_000, who="bob").replace(
        signing_key=mallory.signing_public), mallory, "bob")
    cases = {
        "t-poor": (_submit("t-poor", 100_001, who="bob"), "insufficient-funds"),
        "t-late": (_submit("t-late", 40_000, who="bob", expires=T0 - 1), "quote-expired"),
        "t-dear": (_submit("t-dear", 50_000, who="bob", max_price=40_000), "over-max-price"),
        "t-cheap": (_submit("t-cheap", 299, who="bob"), "price-below-quote"),
        "t-forged": (forged, "bad-signature"),
        "t-stolen": (stolen, "wrong-key"),
    }
    for task_id, (event, reason) in cases.items():
        [out] = d.decide(event)
        assert out.name == "TaskFailed"
        assert (out.fields["task_id"], out.fields["reason"]) == (task_id, reason)
    assert d.book.balance(user("bob")) == 100_000


def test_a_price_update_raises_the_floor_a_quote_must_meet() -> None:
    d = _decider()
    d.decide(_mint("carol", 10**9))
    d.decide(new_event("PriceUpdated", "governance", tier="consumer",
                       price_per_unit_micro=1_000, effective_at=0))
    [out] = d.decide(_submit("t1", 30_000, who="carol"))
    assert (out.name, out.fields["reason"]) == ("TaskFailed", "price-below-quote")
    assert _entries(d.decide(_submit("t2", 300_000, who="carol")))[0] == (
        user("carol"), -300_000, "escrow")


def test_a_signed_registration_locks_the_operators_stake_once() -> None:
    d = _decider()
    d.decide(_mint("op", 5_000_000))
    keys = account_keys("n1")
    consent = sign_stake_consent(account_keys("op"), "", "op", "n1", keys.signing_public,
                                 2_000_000)
    reg = sign_event(with_fields(sample_event("NodeRegistered"), node_id="n1", operator_id="op",
                                 stake_micro=2_000_000, signing_key=keys.signing_public,
                                 operator_consent=consent), keys, "n1")
    assert _entries(d.decide(reg)) == [(user("op"), -2_000_000, "stake"),
                                       (stake("n1"), 2_000_000, "stake")]
    assert d.decide(reg.with_envelope(event_id="00000000-0000-4000-8000-000000000001")) == []
    unsigned = with_fields(reg, node_id="n2").with_envelope(signature=None)
    assert d.decide(unsigned) == []
    assert d.book.balance(user("op")) == 3_000_000


def test_a_failed_task_is_refunded_once() -> None:
    d = _decider()
    d.decide(_mint("alice", 500))
    d.decide(_submit("t1", 500))
    failed = new_event("TaskFailed", "verifier", task_id="t1", reason="no-quorum", detail="")
    assert _entries(d.decide(failed)) == [(escrow("t1"), -500, "refund"),
                                          (user("alice"), 500, "refund")]
    assert d.decide(failed) == []


def test_a_penalty_slashes_stake_but_never_below_zero() -> None:
    d = _decider()
    d.book.balances.update({stake("n1"): 70, "mint": -70})
    penalty = with_fields(sample_event("NodePenalized"), node_id="n1", slash_micro=100)
    assert _entries(d.decide(penalty)) == [(stake("n1"), -70, "slash"), (TREASURY, 70, "slash")]


def test_state_rebuilt_from_entries_and_submissions_decides_as_before() -> None:
    live = _decider()
    entries = live.decide(_mint("alice", 1_000)) + live.decide(_submit("t1", 600))
    # A restarted decider restores its entries, then recalls the escrowed terms.
    again = _decider()
    for e in entries:
        again.restore(e)
    again.remember(_submit("t1", 600))
    assert again.decide(_submit("t1", 600)) == []  # not escrowed twice
    assert again.decide(_submit("t2", 600))[0].fields["reason"] == "insufficient-funds"
    assert _entries(again.decide(_verified("t1", ["n1", "n2", "n3"]))) == _entries(
        live.decide(_verified("t1", ["n1", "n2", "n3"])))


def test_a_decider_restored_from_its_checkpoint_decides_as_before_minus_the_settled() -> None:
    import pickle

    live = _decider()
    live.decide(_mint("alice", 10_000))
    live.decide(_submit("t1", 600))
    live.decide(_submit("t2", 700))
    live.decide(_verified("t1", ["n1", "n2", "n3"]))  # t1 settled: its terms can go
    state = live.checkpoint_state()
    assert set(state["tasks"]) == {"t2"}  # type: ignore[arg-type]
    assert all(b != 0 for b in state["balances"].values())  # type: ignore[attr-defined]
    again = _decider()
    again.restore_state(pickle.loads(pickle.dumps(state)))
    assert again.book.snapshot() == live.book.snapshot()
    assert again.decide(_submit("t1", 600)) == []  # a settled id is not escrowed again
    assert _entries(again.decide(_verified("t2", ["n1", "n2"]))) == _entries(
        live.decide(_verified("t2", ["n1", "n2"])))
