"""Expiring logs (``streams.journal``): what a batch added, undone on a rewind, rebuilt whole.

The runner's side on the real broker (journal written in the batch's transaction, read
back by a restarted runner) is ``tests/integration/test_journal.py``.
"""

from __future__ import annotations

import pickle
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from destra.freshness import Freshness
from destra.settings import Settings
from schemas import Event, encode, new_event
from schemas.signatures import KeyPair
from streams.journal import ExpiringLog, full_state, restore_full
from streams.kafka_runner import KafkaRunner, open_snapshot
from streams.processing import Context, Outcome, Recovery
from tests.unit.test_poison_records import _Consumer, _msg
from tests.unit.test_poison_records import _Producer as _PoisonProducer
from verifier.service import Verifier


def test_an_entry_lives_until_it_expires_and_a_key_keeps_its_first_entry() -> None:
    log = ExpiringLog(horizon_ms=100)
    assert log.add("a", 10, "first") and log.add("b", 30)
    assert not log.add("a", 99, "second")
    assert log.get("a") == "first" and len(log) == 2
    assert log.prune(10) == 0  # expires at 10: still there at 10
    assert log.prune(11) == 1 and "a" not in log and "b" in log
    assert log.entries() == [("b", 30, None)]


def test_prune_stops_at_the_first_entry_still_valid() -> None:
    log = ExpiringLog(horizon_ms=100)
    log.add("late", 50)
    log.add("early", 5)  # out of order: lives until "late" goes
    assert log.prune(20) == 0 and "early" in log
    assert log.prune(51) == 2


def test_added_is_what_the_batch_added_and_commit_clears_it() -> None:
    log = ExpiringLog(horizon_ms=100)
    log.track()
    log.add("a", 10)
    log.commit()
    log.add("b", 20, 7)
    log.add("c", 30)
    assert log.added() == [("b", 20, 7), ("c", 30, None)]
    log.commit()
    assert log.added() == []


def test_rollback_undoes_the_adds_and_prunes_since_the_last_commit() -> None:
    log = ExpiringLog(horizon_ms=100)
    log.track()
    for key, expires in (("a", 10), ("b", 20), ("c", 30)):
        log.add(key, expires, key.upper())
    log.commit()
    committed = log.entries()
    log.prune(25)  # a and b go
    log.add("d", 40)
    log.add("e", 5)
    log.prune(35)  # c goes (d, not expired, stops it before e)
    assert log.entries() == [("d", 40, None), ("e", 5, None)]
    log.rollback()
    assert log.entries() == committed
    assert [log.get(k) for k in "abc"] == ["A", "B", "C"] and "d" not in log
    assert log.added() == []


def test_a_pickled_log_carries_its_entries_and_nothing_pending() -> None:
    log = ExpiringLog(horizon_ms=100)
    log.track()
    log.add("a", 10, (1, 2))
    copy = pickle.loads(pickle.dumps(log))
    assert copy == log and copy.horizon_ms == 100
    assert copy.added() == []


def test_a_log_nobody_journals_keeps_no_changes() -> None:
    """A node's or an audit's log: nothing commits it, so it must not pile up changes."""
    log = ExpiringLog(horizon_ms=100)
    for i in range(1000):
        log.add(i, i)
    log.prune(2000)
    assert log.added() == [] and log._pruned == [] and len(log) == 0


def test_freshness_keeps_its_ids_in_a_log_whose_horizon_is_age_plus_skew() -> None:
    f = Freshness(max_age_ms=1000, max_skew_ms=100)
    assert f.seen.horizon_ms == 1100
    f.seen.track()
    e = new_event("TokensMinted", "t", account="a", amount_micro=1, reason="r")
    f.accept(e)
    assert f.seen.added() == [(e.event_id, e.occurred_at + 1000, None)]
    assert f.refusal(e, e.occurred_at + 10) is not None  # a replay


def test_a_snapshot_from_before_the_journal_is_adopted_and_journaled_next() -> None:
    """A verifier restored from a snapshot that still carried its ids and closed tasks
    (written before this change) keeps them, as additions the next batch journals."""
    old_freshness = Freshness.__new__(Freshness)
    old_freshness.__dict__.update(max_age_ms=300_000, max_skew_ms=60_000, seen={"e1"},
                                  _expiry=deque([(5_000, "e1")]))
    v = Verifier("verifier")
    state = {**v.snapshot(), "freshness": old_freshness, "closed": {"t1": 1_000}}
    fresh = Verifier("verifier")
    for log in fresh.journals().values():
        log.track()  # as a runner does
    fresh.restore(state)
    assert "e1" in fresh.freshness.seen and "t1" in fresh.closed
    assert fresh.closed.added() == [("t1", 1_000 + fresh.forget_after_ms, 1_000)]
    assert fresh.freshness.seen.added() == [("e1", 5_000, None)]


def test_full_state_round_trips_a_verifiers_logs() -> None:
    v = Verifier("verifier")
    v.closed.add("t1", 99, 1)
    v.freshness.seen.add("e1", 98)
    again = Verifier("verifier")
    again.closed.add("stale", 1)
    restore_full(again, pickle.loads(pickle.dumps(full_state(v))))
    assert full_state(again) == full_state(v)
    assert "stale" not in again.closed


# -- the runner: a batch's additions travel in its transaction, undone with a rewind --------

@dataclass
class _Remembers:
    """Remembers each mint's account in an expiring log; raises on an amount of 13, after
    remembering it."""

    name: str = "remembers"
    inputs: frozenset[str] = frozenset({"TokensMinted"})
    recovery: Recovery = Recovery.SNAPSHOT
    log: ExpiringLog = field(default_factory=lambda: ExpiringLog(1_000))
    count: int = 0

    def handle(self, event: Event, ctx: Context) -> Outcome:
        self.log.add(event.event_id, ctx.now_ms + 1_000, event.fields["amount_micro"])
        self.count += 1
        if event.fields["amount_micro"] == 13:
            raise ValueError("thirteen")
        return Outcome()

    def tick(self, ctx: Context) -> Outcome:
        return Outcome()

    def snapshot(self) -> Any:
        return self.count

    def restore(self, state: Any) -> None:
        self.count = state

    def journals(self) -> dict[str, ExpiringLog]:
        return {"log": self.log}


class _Producer(_PoisonProducer):
    """The poison-records test's producer, keeping what is sent raw (state, journal)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[tuple[str, bytes | None, bytes]] = []

    def send_raw(self, topic: str, key: bytes | None, value: bytes, **kw: Any) -> None:
        self.raw.append((topic, key, value))


def test_the_runner_journals_a_batchs_additions_without_the_poisoned_record() -> None:
    keys = KeyPair.generate()
    p = _Remembers()
    runner = KafkaRunner(Settings(topic_prefix="t."), "127.0.0.1:1", [p], group="t.g",
                         snapshot_keys=keys)
    runner._pickled[p.name] = pickle.dumps(p.count)
    mints = [new_event("TokensMinted", "faucet", account="a", amount_micro=a, reason="r")
             for a in (1, 13, 2)]
    producer = _Producer()
    runner._transaction(producer, _Consumer(), [_msg(encode(e), i)  # type: ignore[arg-type]
                                                for i, e in enumerate(mints)], tick=False)
    journal = [v for topic, key, v in producer.raw if topic == "t.processors.journal"]
    assert len(journal) == 1
    logs = open_snapshot(journal[0], keys.signing_public)["logs"]
    assert [(k, v) for k, _, v in logs[("remembers", "log")]] == [
        (mints[0].event_id, 1), (mints[2].event_id, 2)]
    assert mints[1].event_id not in p.log, "rewound: the poisoned record's addition undone"
    assert p.log.added() == [], "committed with the batch"
    state = [v for topic, key, v in producer.raw if topic == "t.processors.state"]
    assert open_snapshot(state[0], keys.signing_public)["states"]["remembers"] == \
        pickle.dumps(2, protocol=pickle.HIGHEST_PROTOCOL)


def test_a_batch_that_adds_nothing_writes_no_journal_record() -> None:
    p = _Remembers()
    runner = KafkaRunner(Settings(topic_prefix="t."), "127.0.0.1:1", [p], group="t.g",
                         snapshot_keys=KeyPair.generate())
    runner._pickled[p.name] = pickle.dumps(p.count)
    producer = _Producer()
    other = new_event("TokensMinted", "faucet", account="a", amount_micro=13, reason="r")
    runner._transaction(producer, _Consumer(), [_msg(encode(other), 0)],  # type: ignore[list-item]
                        tick=False)
    assert [t for t, _, _ in producer.raw] == ["t.processors.state"], \
        "the poisoned record's addition was rewound: nothing to journal"
