"""The ledger judges inputs that move money by id at broker time, and forgets their ids
once a copy would be refused by age: its state stays bounded by the work in flight."""

from __future__ import annotations

import pickle

from allocator.pricing import PriceBook, Tier
from ledger.book import escrow, stake, user
from ledger.decider import (
    MAX_AUTHORITY_AGE_MS,
    MAX_FUTURE_MS,
    LedgerDecider,
)
from schemas import Event, new_event
from schemas.samples import sample_event, with_fields
from streams.processing import Context, Origin, Outcome
from tests.support import registration, signed_submission

T0 = 1_800_000_000_000
MINUTE = 60_000


REGISTERED = ("alice", "bob", "carol", "op")
"""The accounts the tests' ledgers start with, registered to their ``account_keys``."""


def _decider() -> LedgerDecider:
    """A ledger whose network price is 1 micro-token a unit in every tier, with the
    ``REGISTERED`` accounts."""
    d = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))
    for name in REGISTERED:
        assert d.judge(registration(name)).rejected == []
    return d


def _submit(task_id: str, price: int, *, who: str = "alice", at: int = T0,
            quote_ms: int = MINUTE) -> Event:
    """A signed submission made at ``at`` on a quote valid ``quote_ms``."""
    e = with_fields(sample_event("TaskSubmitted"), task_id=task_id, submitter_id=who,
                    quoted_price_micro=price, max_price_micro=price,
                    quote_expires_at=at + quote_ms, compute_units=100, replicas=3, quorum=2)
    return signed_submission(e.with_envelope(occurred_at=at))


def _mint(account: str, amount: int, at: int) -> Event:
    return new_event("TokensMinted", "treasury", occurred_at=at, account=account,
                     amount_micro=amount, reason="test")


def _penalty(node: str, amount: int, at: int) -> Event:
    return with_fields(sample_event("NodePenalized"), node_id=node, slash_micro=amount
                       ).with_envelope(occurred_at=at, event_id=f"pen-{node}-{at}")


def _verified(task_id: str, at: int) -> Event:
    return with_fields(sample_event("TaskVerified"), task_id=task_id, contributions=[
        {"node_id": n, "compute_units": 100, "agreed": True} for n in ("n1", "n2", "n3")]
    ).with_envelope(occurred_at=at)


def _read(d: LedgerDecider, event: Event, at: int, partition: int | None = None) -> Outcome:
    """``event`` as the runner hands it over: read at broker time ``at``."""
    origin = None if partition is None else Origin("t", partition, 0, None)
    return d.handle(event, Context(at, origin=origin))


def _posted(out: Outcome) -> list[tuple[str, str, int, str, int]]:
    return [(e.fields["transaction_id"], e.fields["account"], e.fields["amount_micro"],
             e.fields["kind"], e.occurred_at) for e in out.emit if e.name == "LedgerEntryPosted"]


def _failed(out: Outcome) -> list[tuple[str, str]]:
    return [(e.fields["task_id"], e.fields["reason"]) for e in out.emit if e.name == "TaskFailed"]


def test_a_refused_submission_replayed_after_funding_is_not_escrowed() -> None:
    d = _decider()
    poor = _submit("t1", 300, who="bob")
    assert _failed(_read(d, poor, T0 + 1_000)) == [("t1", "insufficient-funds")]
    _read(d, _mint("bob", 1_000, T0 + 20_000), T0 + 20_000)
    # Within its quote: the first submission (refused) stands, the copy is ignored.
    assert _read(d, poor, T0 + 30_000).emit == []
    # Byte for byte, after its quote expired by the broker's clock: stale.
    late = _read(d, poor, T0 + 2 * MINUTE)
    assert _failed(late) == [("t1", "stale-submission")]
    assert "broker time" in late.emit[0].fields["detail"]
    assert d.book.balance(user("bob")) == 1_000
    assert d.book.balance(escrow("t1")) == 0


def test_a_submission_appended_after_its_quote_expired_is_refused_stale() -> None:
    d = _decider()
    _read(d, _mint("alice", 1_000, T0), T0)
    assert _failed(_read(d, _submit("t1", 300), T0 + MINUTE + 6_000)) == [
        ("t1", "stale-submission")]
    assert d.book.balance(user("alice")) == 1_000
    # Within the clock-skew allowance it counts.
    assert _read(d, _submit("t2", 300), T0 + MINUTE + 4_000).emit[0].name == "LedgerEntryPosted"


def test_a_submission_made_far_ahead_of_broker_time_is_refused() -> None:
    d = _decider()
    _read(d, _mint("alice", 1_000, T0), T0)
    ahead = _submit("t1", 300, at=T0 + MAX_FUTURE_MS + 1_000)
    assert _failed(_read(d, ahead, T0)) == [("t1", "future-submission")]
    assert d.book.balance(user("alice")) == 1_000


def test_a_replayed_old_mint_or_penalty_is_refused_and_moves_nothing() -> None:
    d = _decider()
    mint = _mint("op", 5_000, T0)
    assert _read(d, mint, T0).emit
    assert _read(d, mint, T0 + 1_000).emit == []  # a copy within its age: seen
    old = _read(d, mint, T0 + MAX_AUTHORITY_AGE_MS + 1)
    assert old.emit == [] and len(old.rejected) == 1
    assert old.rejected[0].reason.startswith("stale")
    assert d.book.balance(user("op")) == 5_000
    d.book.balances.update({stake("n1"): 5_000, user("op"): 0})
    penalty = _penalty("n1", 1_000, T0)
    assert _read(d, penalty, T0).emit
    assert _read(d, penalty, T0 + 2_000).emit == []
    replayed = _read(d, penalty, T0 + 20 * MINUTE)
    assert replayed.emit == [] and replayed.rejected[0].reason.startswith("stale")
    assert d.book.balance(stake("n1")) == 4_000
    future = _read(d, _mint("op", 1, T0 + 10 * MINUTE), T0)
    assert future.rejected[0].reason.startswith("future-dated")


def test_ids_are_forgotten_by_broker_time_and_the_checkpoint_stays_flat() -> None:
    d = _decider()
    _read(d, _mint("alice", 10**12, T0), T0)
    d.book.balances.update({stake("n1"): 10**9, "mint": d.book.balance("mint") - 10**9})
    sizes = {}
    for i in range(3_000):
        at = T0 + i * 1_000  # a task a second
        _read(d, _submit(f"t{i}", 300, at=at), at)
        _read(d, _verified(f"t{i}", at + 500), at + 500)
        if i % 5 == 0:
            _read(d, _penalty("n1", 1, at + 600), at + 600)
        if i in (1_500, 2_999):
            sizes[i] = len(pickle.dumps(d.checkpoint_state()))
            d.checkpoint_taken()
    # Kept: the submissions of the last quote (60 s + skew), the penalties of the last
    # 10 minutes; not the 3,000 tasks and 600 penalties of history.
    assert len(d.horizon) < 70 + 125
    assert not any(k.startswith(("settle/", "escrow/")) for k in d.book.applied)
    assert sizes[2_999] < sizes[1_500] * 1.1
    assert d.book.total() == 0


def test_an_id_is_kept_while_a_partition_of_its_topic_lags() -> None:
    d = _decider()
    _read(d, _mint("alice", 10_000, T0), T0)
    first = _submit("t1", 300)
    assert _read(d, first, T0, partition=0).emit
    _read(d, _verified("t1", T0 + 1_000), T0 + 1_000)  # settled: no longer in flight
    for p in range(1, 5):  # the others read 10 minutes ahead; partition 5 not read yet
        _read(d, _submit(f"u{p}", 300, at=T0 + 10 * MINUTE), T0 + 10 * MINUTE, partition=p)
    # A copy appended in time on the lagging partition still finds the id.
    assert _read(d, first, T0 + 30_000, partition=5).emit == []
    assert d.book.balance(escrow("t1")) == 0
    # Once every partition is past its expiry, the id goes (a copy would be stale).
    _read(d, _submit("u5", 300, at=T0 + 10 * MINUTE), T0 + 10 * MINUTE, partition=5)
    _read(d, _submit("u0", 300, at=T0 + 10 * MINUTE), T0 + 10 * MINUTE, partition=0)
    assert "task/t1" not in d.horizon


def test_a_rebuild_from_checkpoint_and_tail_decides_as_the_live_ledger() -> None:
    live = _decider()
    _read(live, _mint("alice", 10**6, T0), T0)
    _read(live, _mint("op", 10**6, T0), T0)
    live.book.balances.update({stake("n1"): 10**6, "mint": live.book.balance("mint") - 10**6})
    for i in range(100):
        at = T0 + i * 1_000
        _read(live, _submit(f"t{i}", 300, at=at), at)
        if i < 95:
            _read(live, _verified(f"t{i}", at + 500), at + 500)
    # The checkpoint's batch: its entries are in the state and also after entries_from.
    batch_at = T0 + 100_000
    batch = _read(live, _submit("b1", 300, at=batch_at), batch_at).emit
    state = pickle.loads(pickle.dumps(live.checkpoint_state()))
    live.checkpoint_taken()
    # The tail: what was committed after the checkpoint.
    tail: list[Event] = list(batch)
    submissions: list[Event] = []
    poor = _submit("p1", 300, who="carol", at=T0 + 101_000)
    for at, event in ((T0 + 101_000, poor), (T0 + 102_000, _submit("b2", 300, at=T0 + 102_000)),
                      (T0 + 103_000, _verified("t96", T0 + 103_000)),
                      (T0 + 104_000, _mint("alice", 7, T0 + 104_000)),
                      (T0 + 105_000, _penalty("n1", 10, T0 + 105_000))):
        tail += _read(live, event, at).emit
        if event.name == "TaskSubmitted":
            submissions.append(event)
    again = _decider()
    again.restore_state(state)
    before = set(again.recent)
    again.checkpoint_taken()
    for e in tail:
        if e.name == "LedgerEntryPosted" and e.fields["transaction_id"] not in before:
            again.restore(e)
        elif e.name == "TaskFailed":
            again.refused(e)
    for s in submissions:
        again.remember(s)
    assert again.book.snapshot() == live.book.snapshot()
    assert again.tasks == live.tasks
    assert again.account_keys == live.account_keys
    assert set(live.horizon.expires) <= set(again.horizon.expires)
    # The same decisions on what comes next: copies of tail inputs, new work, verdicts.
    funded = _mint("carol", 1_000, T0 + 106_000)
    _read(again, funded, T0 + 106_000)
    _read(live, funded, T0 + 106_000)
    probes = [(T0 + 107_000, poor), (T0 + 107_500, _penalty("n1", 10, T0 + 105_000)),
              (T0 + 108_000, _submit("b2", 300, at=T0 + 102_000)),
              (T0 + 109_000, _verified("b1", T0 + 109_000)),
              (T0 + 110_000, _verified("t97", T0 + 110_000)),
              (T0 + 111_000, _submit("n9", 300, at=T0 + 111_000)),
              (T0 + 40 * MINUTE, poor)]
    for at, event in probes:
        a, b = _read(live, event, at), _read(again, event, at)
        assert _posted(a) == _posted(b)
        assert _failed(a) == _failed(b)
        assert len(a.rejected) == len(b.rejected)
    assert again.book.snapshot() == live.book.snapshot()
    assert again.book.balance(user("carol")) == 1_000  # the replayed refusal escrowed nothing
    assert set(again.horizon.expires) == set(live.horizon.expires)
