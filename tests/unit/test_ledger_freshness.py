"""The ledger judges inputs that move money by id at broker time, and forgets their ids
once a copy would be refused by age: its state stays bounded by the work in flight."""

from __future__ import annotations

import pickle

import pytest

from allocator.pricing import PriceBook, Tier
from destra.settings import Settings
from ledger.book import escrow, stake, user
from ledger.decider import (
    MAX_AUTHORITY_AGE_MS,
    MAX_FUTURE_MS,
    LedgerDecider,
)
from schemas import Event, encode, new_event
from schemas.samples import sample_event, with_fields
from streams.memory import MemoryRunner
from streams.processing import Context, Origin, Outcome
from streams.topics import topic_for
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
    # Byte for byte, after its quote expired by the broker's clock: still the first
    # submission's id (kept its whole ten minutes), ignored; no second verdict.
    late = _read(d, poor, T0 + 2 * MINUTE)
    assert late.emit == [] and late.rejected == []
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
    # Kept: the submissions and penalties of the last 10 minutes (a task id its whole
    # MAX_SUBMISSION_AGE_MS, so no stale copy fails a verified task); not the 3,000 tasks
    # and 600 penalties of history.
    assert len(d.horizon) < 610 + 125
    assert not any(k.startswith(("settle/", "escrow/")) for k in d.book.applied)
    assert sizes[2_999] < sizes[1_500] * 1.1
    assert d.book.total() == 0


def test_an_id_is_kept_while_a_partition_of_its_topic_lags() -> None:
    d = _decider()
    _read(d, _mint("alice", 10_000, T0), T0)
    first = _submit("t1", 300)
    assert _read(d, first, T0, partition=0).emit
    _read(d, _verified("t1", T0 + 1_000), T0 + 1_000)  # settled: no longer in flight
    for p in range(1, 5):  # the others read 11 minutes ahead; partition 5 not read yet
        _read(d, _submit(f"u{p}", 300, at=T0 + 11 * MINUTE), T0 + 11 * MINUTE, partition=p)
    # A copy appended in time on the lagging partition still finds the id.
    assert _read(d, first, T0 + 30_000, partition=5).emit == []
    assert d.book.balance(escrow("t1")) == 0
    # Once every partition is past its expiry, the id goes (a copy would be stale).
    _read(d, _submit("u5", 300, at=T0 + 11 * MINUTE), T0 + 11 * MINUTE, partition=5)
    _read(d, _submit("u0", 300, at=T0 + 11 * MINUTE), T0 + 11 * MINUTE, partition=0)
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


# -- a refused mint takes its id -----------------------------------------------------------------


def test_a_mint_refused_for_an_unregistered_account_takes_its_id() -> None:
    # Refused before the account existed, the same signed mint replayed byte for byte within
    # its validity, once the account is registered, must not be credited: its id is taken.
    d = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))
    mint = _mint("dave", 5_000, T0)
    refused = _read(d, mint, T0)
    assert refused.emit == [] and refused.rejected[0].reason.startswith("unregistered-account")
    assert _read(d, registration("dave"), T0 + 1_000).rejected == []
    replayed = _read(d, mint, T0 + 2_000)
    assert _posted(replayed) == []
    assert d.book.balance(user("dave")) == 0
    # A new mint (a new event id) counts.
    assert _posted(_read(d, _mint("dave", 5_000, T0 + 3_000), T0 + 3_000))
    assert d.book.balance(user("dave")) == 5_000
    assert d.book.total() == 0


def test_the_id_of_a_refused_mint_survives_a_rebuild() -> None:
    # Before the checkpoint: in its state. After it: the rebuild recalls it from the mints
    # the live run read (the inputs between the checkpoint's positions and the last batch's):
    # a validly signed, fresh mint takes its id whether it was credited or refused, so it is
    # derived from the log alone, whatever the registry's read order was.
    live = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))
    early = _mint("dave", 5_000, T0)
    assert _read(live, early, T0).rejected
    state = pickle.loads(pickle.dumps(live.checkpoint_state()))
    live.checkpoint_taken()
    late = _mint("dave", 7_000, T0 + 10_000)
    assert _read(live, late, T0 + 10_000).rejected
    again = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))
    again.restore_state(state)
    again.checkpoint_taken()
    again.recall_mint(late, T0 + 10_000)
    assert set(again.horizon.expires) == set(live.horizon.expires)
    for d in (live, again):
        _read(d, registration("dave"), T0 + 20_000)
        assert _posted(_read(d, early, T0 + 30_000)) == []
        assert _posted(_read(d, late, T0 + 31_000)) == []
        assert d.book.balance(user("dave")) == 0
    # A stale or future-dated mint took no id, live or rebuilt.
    stale = _mint("dave", 1, T0)
    again.recall_mint(stale, T0 + MAX_AUTHORITY_AGE_MS + 1)
    assert f"mint/{stale.event_id}" not in again.horizon


def test_a_replayed_refused_mint_is_not_credited_on_the_memory_runner() -> None:
    decider = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))
    runner = MemoryRunner([decider])
    mint = _mint("dave", 5_000, runner.now_ms)
    runner.publish(mint, source="treasury")
    assert [reason.split(":")[0] for _, reason in runner.dead_letters] == [
        "unregistered-account"]
    runner.advance(1_000)
    runner.publish(registration("dave"))
    runner.advance(1_000)
    runner.publish(mint, source="replayer")
    assert runner.events("LedgerEntryPosted") == []
    assert decider.book.balance(user("dave")) == 0


# -- a stale copy of a decided submission never fails its task ------------------------------------


def test_a_stale_copy_of_a_verified_task_emits_no_failure() -> None:
    d = _decider()
    _read(d, _mint("alice", 10_000, T0), T0)
    sub = _submit("t1", 300)  # made at T0 on a one-minute quote
    assert _posted(_read(d, sub, T0 + 1_000))
    _read(d, _verified("t1", T0 + 5_000), T0 + 5_000)
    # Past its quote: the other submissions move the watermark on. A copy is ignored.
    _read(d, _submit("u1", 300, at=T0 + 3 * MINUTE), T0 + 3 * MINUTE)
    copy = _read(d, sub, T0 + 3 * MINUTE + 1)
    assert copy.emit == [] and copy.rejected == []
    # Past its ten minutes, once the id is forgotten: no submitter waits for a submission
    # that old, so it is dead-lettered with the reason, never a TaskFailed.
    _read(d, _submit("u2", 300, at=T0 + 11 * MINUTE), T0 + 11 * MINUTE)
    assert "task/t1" not in d.horizon
    late = _read(d, sub, T0 + 11 * MINUTE + 1)
    assert _failed(late) == []
    assert late.rejected[0].reason.startswith("stale-submission")
    assert d.book.balance(escrow("t1")) == 0
    assert d.book.total() == 0


def test_a_stale_copy_of_a_verified_task_on_the_memory_runner() -> None:
    decider = _decider()
    runner = MemoryRunner([decider], now_ms=T0)
    runner.publish(_mint("alice", 10_000, T0), source="treasury")
    sub = _submit("t1", 300)
    runner.publish(sub, source="alice")
    runner.publish(_verified("t1", runner.now_ms), source="verifier")
    for minutes in (2, 9, 12):  # others submit; a copy of t1 is replayed each time
        runner.advance(minutes * MINUTE - (runner.now_ms - T0))
        runner.publish(_submit(f"u{minutes}", 300, at=runner.now_ms), source="alice")
        runner.publish(sub, source="replayer")
    assert [e.fields["task_id"] for e in runner.events("TaskFailed")] == []
    assert [r.split(":")[0] for _, r in runner.dead_letters] == ["stale-submission"]


def test_the_rebuild_recalls_the_ids_of_the_mints_decided_and_only_those(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ledger.processor as processor

    class _Rec:
        def __init__(self, value: bytes, partition: int, offset: int, at: int) -> None:
            self._value, self._partition, self._offset, self._at = value, partition, offset, at

        def value(self) -> bytes:
            return self._value

        def topic(self) -> str:
            return topic_for("TokensMinted").name("t.")

        def partition(self) -> int:
            return self._partition

        def offset(self) -> int:
            return self._offset

        def timestamp(self) -> tuple[int, int]:
            return (2, self._at)  # LogAppendTime

    class _Genesis:
        @staticmethod
        def check(event: Event) -> str | None:
            return None if event.producer_id == "treasury" else "not the treasury's"

    refused = _mint("dave", 5_000, T0)
    forged = new_event("TokensMinted", "mallory", occurred_at=T0, account="dave",
                       amount_micro=1, reason="test")
    stale = _mint("dave", 6_000, T0)
    unread = _mint("dave", 7_000, T0 + 2_000)
    topic = topic_for("TokensMinted").name("t.")
    records = [_Rec(encode(refused), 0, 5, T0 + 1_000), _Rec(encode(forged), 0, 6, T0 + 1_000),
               _Rec(encode(stale), 1, 3, T0 + MAX_AUTHORITY_AGE_MS + 1),
               _Rec(encode(unread), 1, 4, T0 + 2_000)]
    monkeypatch.setattr(processor, "read_all", lambda bootstrap, t, start=None: [
        r for r in records if t == topic and r.offset() >= (start or {}).get(
            (topic, r.partition()), 0)])
    d = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))
    processor.rebuild(Settings(topic_prefix="t."), "127.0.0.1:1", d,
                      genesis=_Genesis(),  # type: ignore[arg-type]
                      checkpoint=None, decided={(topic, 0): 7, (topic, 1): 4})
    # The refused mint's id is taken; the forged one and the stale one took none; the one
    # past the last committed batch is not decided yet: the runner reads it next.
    assert set(d.horizon.expires) == {f"mint/{refused.event_id}"}
    _read(d, registration("dave"), T0 + 3_000)
    assert _posted(_read(d, refused, T0 + 3_000)) == []
    assert _posted(_read(d, unread, T0 + 3_000))
    assert d.book.balance(user("dave")) == 7_000


def test_a_rebuild_takes_no_id_for_a_submission_refused_before_its_id_was_taken() -> None:
    # Refused for an unregistered account, a submission took no id live; rebuilt from its
    # TaskFailed, neither: once registered and funded, its copy is escrowed in both.
    live = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))
    sub = _submit("t1", 300, who="erin")
    [failed] = _read(live, sub, T0).emit
    assert failed.fields["reason"] == "unregistered-account"
    again = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))
    again.restore_state(pickle.loads(pickle.dumps(live.checkpoint_state())))
    again.refused(failed)
    again.remember(sub)
    for d in (live, again):
        _read(d, registration("erin"), T0 + 1_000)
        _read(d, _mint("erin", 1_000, T0 + 1_000), T0 + 1_000)
        assert [t for t, *_ in _posted(_read(d, sub, T0 + 2_000))] == ["escrow/t1"] * 2
