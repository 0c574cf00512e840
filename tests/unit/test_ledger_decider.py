"""The ledger's decisions on domain events: escrow or a reasoned rejection, pay once."""

from __future__ import annotations

from ledger.book import TREASURY, escrow, stake, user
from ledger.decider import LedgerDecider, node_wallet
from schemas import Event, new_event
from schemas.samples import sample_event, with_fields

T0 = 1_800_000_000_000


def _submit(task_id: str, price: int, *, who: str = "alice", expires: int = T0 + 60_000,
            max_price: int | None = None) -> Event:
    e = with_fields(sample_event("TaskSubmitted"), task_id=task_id, submitter_id=who,
                    quoted_price_micro=price, max_price_micro=max_price or price,
                    quote_expires_at=expires, compute_units=100, replicas=3, quorum=2)
    return e.with_envelope(occurred_at=T0)


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
    d = LedgerDecider("ledger")
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
    d = LedgerDecider("ledger")
    d.decide(_mint("alice", 1_000_000))
    d.decide(_submit("t1", 300_000))
    assert d.decide(_verified("t1", ["n1", "n2", "n3"]))
    assert d.decide(_verified("t1", ["n1", "n2", "n3"])) == []
    assert d.book.balance(node_wallet("n1")) == 95_000


def test_rejections_carry_their_reason_and_move_no_money() -> None:
    d = LedgerDecider("ledger")
    d.decide(_mint("bob", 100))
    cases = {
        "t-poor": (_submit("t-poor", 101, who="bob"), "insufficient-funds"),
        "t-late": (_submit("t-late", 10, who="bob", expires=T0 - 1), "quote-expired"),
        "t-dear": (_submit("t-dear", 50, who="bob", max_price=40), "over-max-price"),
    }
    for task_id, (event, reason) in cases.items():
        [out] = d.decide(event)
        assert out.name == "TaskFailed"
        assert (out.fields["task_id"], out.fields["reason"]) == (task_id, reason)
    assert d.book.balance(user("bob")) == 100


def test_a_failed_task_is_refunded_once() -> None:
    d = LedgerDecider("ledger")
    d.decide(_mint("alice", 500))
    d.decide(_submit("t1", 500))
    failed = new_event("TaskFailed", "verifier", task_id="t1", reason="no-quorum", detail="")
    assert _entries(d.decide(failed)) == [(escrow("t1"), -500, "refund"),
                                          (user("alice"), 500, "refund")]
    assert d.decide(failed) == []


def test_a_penalty_slashes_stake_but_never_below_zero() -> None:
    d = LedgerDecider("ledger")
    d.book.balances.update({stake("n1"): 70, "mint": -70})
    penalty = with_fields(sample_event("NodePenalized"), node_id="n1", slash_micro=100)
    assert _entries(d.decide(penalty)) == [(stake("n1"), -70, "slash"), (TREASURY, 70, "slash")]


def test_state_rebuilt_from_entries_and_submissions_decides_as_before() -> None:
    live = LedgerDecider("ledger")
    entries = live.decide(_mint("alice", 1_000)) + live.decide(_submit("t1", 600))
    # A restarted decider restores its entries, then recalls the escrowed terms.
    again = LedgerDecider("ledger")
    for e in entries:
        again.restore(e)
    again.remember(_submit("t1", 600))
    assert again.decide(_submit("t1", 600)) == []  # not escrowed twice
    assert again.decide(_submit("t2", 600))[0].fields["reason"] == "insufficient-funds"
    assert _entries(again.decide(_verified("t1", ["n1", "n2", "n3"]))) == _entries(
        live.decide(_verified("t1", ["n1", "n2", "n3"])))
