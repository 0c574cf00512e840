"""No poison pill: a record no processor can handle is dead-lettered with a reason, never a
crash, and leaves no half-applied state (the broker-level test is
tests/integration/test_poison_records.py)."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest

from destra.crypto import sign_event
from destra.settings import Settings
from ledger.book import escrow, user
from schemas import Event, decode, encode, new_event
from schemas.samples import sample_event, with_fields
from schemas.signatures import KeyPair
from streams.consumer import DEAD_LETTER_COPY_MAX_BYTES, letter
from streams.kafka_runner import KafkaRunner
from streams.processing import Context, Outcome, Recovery
from streams.producer import EventProducer, RecordTooLarge
from streams.topics import DEFAULT_MAX_MESSAGE_BYTES, topic_for
from tests.support import Record
from tests.unit.test_ledger_decider import _decider, _mint, _submit, _verified
from tests.unit.test_verifier_service import NODES, _registered, account_keys
from verifier.service import Verifier

T0 = 1_800_000_000_000


# -- dead letters: copied when they fit, referenced when they do not ----------------------------

def test_a_small_record_is_copied_into_its_dead_letter() -> None:
    dead = letter("t.tasks.verdicts", 2, 7, b"k", b"\x00bad", "why", "CorruptEvent", "p")
    back = decode(encode(dead))
    assert (back.fields["key"], back.fields["value"]) == (b"k", b"\x00bad")
    assert back.fields["original_size"] is None and back.fields["original_sha256"] is None


def test_a_record_too_large_to_copy_is_referenced_by_position_size_and_digest() -> None:
    value = bytes(5 * 1024 * 1024)
    dead = letter("t.tasks.verdicts", 2, 7, b"key", value, "x" * 10_000, "CorruptEvent", "p")
    encoded = encode(dead)
    # It fits the dead-letter topic, whatever the size of the original.
    assert len(encoded) < topic_for("DeadLettered").max_record_bytes
    back = decode(encoded).fields
    assert (back["source_topic"], back["source_partition"], back["source_offset"]) == (
        "t.tasks.verdicts", 2, 7)
    assert back["value"] == b"" and back["key"] is None
    assert back["original_size"] == len(value) + 3
    assert back["original_sha256"] == hashlib.sha256(value).hexdigest()
    assert len(back["reason"]) == 2000


def test_the_copy_limit_leaves_room_under_the_dead_letter_topics_record_limit() -> None:
    assert DEAD_LETTER_COPY_MAX_BYTES * 2 <= DEFAULT_MAX_MESSAGE_BYTES
    at_limit = letter("t", 0, 0, None, bytes(DEAD_LETTER_COPY_MAX_BYTES), "r", "E", "p")
    assert decode(encode(at_limit)).fields["original_size"] is None


# -- produce-time limits ------------------------------------------------------------------------

def test_the_producer_refuses_an_event_over_its_topics_record_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import streams.producer as producer_module

    spec = topic_for("TokensMinted")
    small = type(spec)(**{**spec.__dict__, "max_message_bytes": 300})
    monkeypatch.setattr(producer_module, "topic_for", lambda name: small)
    producer = EventProducer(Settings(topic_prefix="t."), "127.0.0.1:1")
    mint = new_event("TokensMinted", "faucet", account="a" * 100, amount_micro=1,
                     reason="r" * 200)
    with pytest.raises(RecordTooLarge, match="record limit of topic ledger.mints"):
        producer.send(mint)
    assert producer._producer is None, "refused before anything reached the client"


# -- the ledger: an unpayable verdict is refused whole --------------------------------------------

def test_a_verdict_whose_shares_exceed_the_escrow_is_refused_and_moves_nothing() -> None:
    d = _decider()
    d.decide(_mint("alice", 1_000_000))
    d.decide(_submit("t1", 300_000))
    before = (dict(d.book.balances), set(d.book.applied), dict(d.tasks), set(d.recent))
    # 4 replicas x 100 units claimed against 3 x 100 escrowed.
    outcome = d.judge(_verified("t1", ["n1", "n2", "n3", "n4"]))
    assert outcome.emit == []
    assert len(outcome.rejected) == 1
    assert "unpayable-verdict" in outcome.rejected[0].reason
    assert "exceed" in outcome.rejected[0].reason
    assert (dict(d.book.balances), set(d.book.applied), dict(d.tasks), set(d.recent)) == before
    # The escrow still holds; a payable verdict for the task still settles it.
    assert d.book.balance(escrow("t1")) == 300_000
    assert d.decide(_verified("t1", ["n1", "n2", "n3"]))
    assert d.book.balance(escrow("t1")) == 0
    assert d.book.total() == 0


def test_a_mint_the_book_refuses_is_dead_lettered_and_takes_its_id() -> None:
    d = _decider()
    # Past the schema's range: only a decoder's bug would let it through.
    mint = with_fields(_mint("alice", 5), amount_micro=0).with_envelope(occurred_at=T0)
    outcome = d.judge(mint)
    assert "invalid-mint" in outcome.rejected[0].reason
    # Signed and fresh, it takes its id like every mint, credited or refused (a rebuild
    # derives the ids from the mints read alone).
    assert f"mint/{mint.event_id}" in d.horizon
    assert d.book.balance(user("alice")) == 0


# -- the verifier: an impossible quorum fails the task, with a dead letter -------------------------

def test_an_assignment_of_a_task_with_an_impossible_quorum_is_refused_and_fails_it() -> None:
    v = Verifier("verifier")
    _registered(v)
    v.on_submitted(with_fields(sample_event("TaskSubmitted"), task_id="t", replicas=3,
                               quorum=1, compute_units=7, deadline_ms=60_000,
                               submitter_id="alice",
                               signing_key=account_keys("alice").signing_public)
                   .with_envelope(occurred_at=T0), T0)
    out = []
    for i, n in enumerate(NODES):
        out += v.on_assigned(new_event("TaskAssigned", "alloc", task_id="t", node_id=n,
                                       replica_index=i, attempt=0,
                                       commit_deadline=T0 + 10_000,
                                       reveal_deadline=T0 + 20_000), T0, f"where-{n}")
    assert [(e.name, e.fields["reason"]) for e in out] == [("TaskFailed", "invalid_quorum")]
    reasons = [reason for _, _, reason in v.rejected]
    assert len(reasons) == 3
    assert reasons[0].startswith("invalid-quorum:") and "quorum 1 of 3" in reasons[0]
    assert all("has its verdict" in r for r in reasons[1:])
    assert "t" not in v.tallies and "t" not in v.open_tasks


# -- the Kafka runner: a handler that raises refuses its event, its state rewound ------------

def _msg(value: bytes, offset: int, topic: str = "t.ledger.mints") -> Record:
    return Record(value, offset, topic, T0, b"alice")


@dataclass
class _Counter:
    """Counts mints, raising midway through a poison one (after changing its state)."""

    recovery: Recovery
    name: str = "counter"
    inputs: frozenset[str] = frozenset({"TokensMinted"})
    total: int = 0
    seen: list[int] = field(default_factory=list)

    def handle(self, event: Event, ctx: Context) -> Outcome:
        amount = event.fields["amount_micro"]
        self.seen.append(amount)
        if amount == 13:
            self.total += 1_000  # half-applied, then:
            raise ValueError("thirteen is unlucky")
        self.total += amount
        return Outcome.of([new_event("PriceUpdated", "pricing", tier="standard",
                                     price_per_unit_micro=amount, effective_at=T0)])

    def tick(self, ctx: Context) -> Outcome:
        return Outcome()

    def snapshot(self) -> Any:
        return self.total

    def restore(self, state: Any) -> None:
        self.total = state


class _Producer:
    def __init__(self) -> None:
        self.sent: list[Event] = []

    def begin(self) -> None:
        pass

    def send(self, event: Event) -> Event:
        encode(event)  # what the real one checks before sending
        self.sent.append(event)
        return event

    def send_raw(self, *args: Any, **kwargs: Any) -> None:
        pass

    def commit_positions(self, consumer: Any) -> None:
        pass


class _Consumer:
    def position(self, partitions: list[Any]) -> list[Any]:
        return []


def _batch(*amounts: int) -> list[Record]:
    return [_msg(encode(new_event("TokensMinted", "faucet", account="alice",
                                  amount_micro=a, reason="r")), offset)
            for offset, a in enumerate(amounts)]


@pytest.mark.parametrize("recovery", [Recovery.SNAPSHOT, Recovery.REPLAY])
def test_a_handler_that_raises_has_its_event_dead_lettered_and_the_batch_goes_on(
        recovery: Recovery) -> None:
    counter = _Counter(recovery)
    counter.total = 100  # as restored after the last committed batch
    runner = KafkaRunner(Settings(topic_prefix="t."), "127.0.0.1:1", [counter],
                         group="t.test", snapshot_keys=KeyPair.generate())
    runner._pickled[counter.name] = pickle.dumps(counter.total)
    producer = _Producer()
    runner._transaction(producer, _Consumer(), _batch(1, 13, 2), tick=False)  # type: ignore[arg-type]

    letters = [e for e in producer.sent if e.name == "DeadLettered"]
    assert [(e.fields["source_offset"], e.fields["error"]) for e in letters] == [
        (1, "ValueError" if recovery == Recovery.SNAPSHOT else "Rejected")]
    assert "handler-error: ValueError: thirteen is unlucky" in letters[0].fields["reason"]
    assert decode(letters[0].fields["value"]).fields["amount_micro"] == 13
    prices = [e.fields["price_per_unit_micro"] for e in producer.sent if e.name == "PriceUpdated"]
    assert prices == [1, 2], "the events around it are handled, each once in the output"
    if recovery == Recovery.SNAPSHOT:
        # Rewound to the last committed state and run again without the poison record:
        # the half-applied 1,000 is gone.
        assert counter.total == 103
        assert counter.seen == [1, 13, 1, 2]
    else:
        # A replayed processor cannot be rewound: its handlers must validate before they
        # change anything (the ledger decider does); this one did not, and shows it.
        assert counter.total == 1_103
        assert counter.seen == [1, 13, 2]


# -- the ledger's rebuild: what the live run ignored, the rebuild ignores -------------------------

def test_the_ledger_rebuild_skips_an_event_of_another_type_on_the_submissions_topic(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ledger.processor as processor

    class _Rec:
        def __init__(self, value: bytes) -> None:
            self._value = value

        def value(self) -> bytes:
            return self._value

    submitted = _submit("t1", 300_000)
    stray = encode(sample_event("NodeHeartbeat"))  # written to tasks.submitted by anyone
    topics = {topic_for("TaskSubmitted").name("t."): [stray, encode(submitted)]}
    monkeypatch.setattr(processor, "read_all", lambda bootstrap, topic, start=None: [
        _Rec(v) for v in topics.get(topic, [])])
    d = _decider()
    processor.rebuild(Settings(topic_prefix="t."), "127.0.0.1:1", d, genesis=None,  # type: ignore[arg-type]
                      checkpoint=None)
    # It went past the stray event to the submission after it: its account is bound.
    assert d.account_keys["alice"] == submitted.fields["signing_key"]


def test_ids_no_postgres_text_can_hold_move_no_money() -> None:
    d = _decider()
    d.decide(_mint("alice", 1_000_000))
    out = d.decide(_submit("t\x00", 300_000))
    assert [(e.name, e.fields["reason"]) for e in out] == [("TaskFailed", "invalid-id")]
    assert d.book.balance(user("alice")) == 1_000_000 and "t\x00" not in d.tasks
    refused = d.judge(_mint("bob\x00", 5).with_envelope(occurred_at=T0), T0)
    assert "NUL" in refused.rejected[0].reason and d.book.balance(user("bob\x00")) == 0
    d.decide(_mint("op", 1_000_000))
    keys = account_keys("n\x00")
    registered = sign_event(with_fields(
        sample_event("NodeRegistered"), node_id="n\x00", operator_id="op", stake_micro=1_000,
        signing_key=keys.signing_public).with_envelope(occurred_at=T0), keys, "n\x00")
    assert d.decide(registered) == []
    assert d.book.balance(user("op")) == 1_000_000
