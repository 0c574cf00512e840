"""Forged service events on a real broker: written straight to the topics, unsigned or signed
with a random key, every consumer dead-letters them and nothing changes; a mint signed with
the treasury key credits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, Message

from destra.crypto import KeyPair, sign_event
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from ledger.book import user
from ledger.projection import LedgerProjection
from ledger.views import ViewProjection
from schemas import Event, decode, new_event
from schemas.samples import sample_event
from streams.authority import AUTHORITY
from streams.consumer import dead_letter_topic
from streams.producer import EventProducer
from streams.reading import read_all
from tests.support import TEARDOWN_GRACE_S, eventually

pytestmark = pytest.mark.integration

FUNDS = 5_000_000
TASK, VICTIM, MALLORY = "task-forged", "node-victim", "mallory"

FORGED: dict[str, dict[str, object]] = {
    "TokensMinted": {"account": MALLORY, "amount_micro": 10**12},
    # An escrow credit: the entry the allocator acts on (it would place an unpaid task),
    # and a balance the projection would fold.
    "LedgerEntryPosted": {"account": f"escrow:{TASK}", "amount_micro": 10**12,
                          "kind": "escrow", "transaction_id": f"escrow/{TASK}",
                          "task_id": TASK},
    "TaskVerified": {"task_id": TASK, "contributions": [
        {"node_id": VICTIM, "compute_units": 1_000, "agreed": True}]},
    "TaskFailed": {"task_id": TASK},
    "NodePenalized": {"node_id": VICTIM, "task_id": TASK, "slash_micro": 1_000},
    "PriceUpdated": {"tier": "consumer", "price_per_unit_micro": 1},
    "RevealOpened": {"task_id": TASK, "node_id": VICTIM},
    "TaskAssigned": {"task_id": TASK, "node_id": VICTIM},
}

# The processes that act on each event type (and so must each refuse it): the ledger
# processor, the projector (ledger and views) and the processors worker (allocator and
# verifier). A processor checks only what it would act on: the allocator reads a
# ledger entry only if it is an escrow credit.
READERS = {
    "TokensMinted": {"ledger-processor"},
    "PriceUpdated": {"ledger-processor"},
    "TaskVerified": {"ledger-processor", "projector", "processors"},
    "TaskFailed": {"ledger-processor", "projector", "processors"},
    "NodePenalized": {"ledger-processor", "projector"},
    "LedgerEntryPosted": {"projector", "processors"},
    "TaskAssigned": {"projector", "processors"},
    "RevealOpened": {"projector"},
}


@pytest.fixture
def local_network(network: Settings, kafka: str, pg_dsn: str,
                  tmp_path: Path) -> Iterator[LocalNetwork]:
    net = LocalNetwork(network.with_(home=tmp_path / "home"), kafka, create_database(pg_dsn),
                       tmp_path / "logs")
    yield net
    net.stop(timeout_s=TEARDOWN_GRACE_S)


def _forgeries() -> list[tuple[str, Event]]:
    """Each authority event type twice: unsigned, and signed as its role by a random key."""
    out = []
    for name, fields in FORGED.items():
        event = sample_event(name).replace(**fields)
        out.append(("unsigned", event))
        out.append(("random-key", sign_event(sample_event(name).replace(**fields),
                                             KeyPair.generate(), AUTHORITY[name][0])))
    return out


def _letters(net: LocalNetwork) -> list[Event]:
    return [decode(m.value()) for m in read_all(net.bootstrap, dead_letter_topic(net.settings))]


def test_forged_service_events_are_dead_lettered_everywhere_and_a_treasury_mint_credits(
    local_network: LocalNetwork,
) -> None:
    net = local_network
    net.start_services()

    # Forgeries written straight to each topic, as anyone reaching the broker could.
    written: dict[tuple[str, int, int], tuple[str, str]] = {}

    def record(kind: str, name: str):  # type: ignore[no-untyped-def]
        def done(err: KafkaError | None, msg: Message) -> None:
            assert err is None, err
            written[(msg.topic(), msg.partition(), msg.offset())] = (name, kind)
        return done

    with EventProducer(net.settings, net.bootstrap) as producer:
        for kind, event in _forgeries():
            producer.send(event, on_delivery=record(kind, event.name))
    assert len(written) == 2 * len(FORGED)

    # A mint signed with the treasury key, after them, to a registered account: it credits.
    net.wait_bound(net.register_accounts("alice"))
    with EventProducer(net.settings, net.bootstrap, signer=net.signer("treasury")) as producer:
        mint = producer.send(new_event("TokensMinted", "operator", account="alice",
                                       amount_micro=FUNDS, reason="test"))
    assert mint.signer == "treasury"

    # Every reader of each forgery dead-letters it, saying why.
    def refused_by_all_readers() -> bool:
        seen: dict[tuple[str, int, int], set[str]] = {}
        for letter in _letters(net):
            f = letter.fields
            where = (f["source_topic"], f["source_partition"], f["source_offset"])
            if where in written:
                name, kind = written[where]
                expected = ("unsigned-authority-event: " if kind == "unsigned"
                            else "bad-signature: ") + name
                assert f["reason"].startswith(expected), (f["reason"], name, kind)
                seen.setdefault(where, set()).add(letter.producer_id)
        net.check_alive()
        return all(READERS[name] <= seen.get(where, set())
                   for where, (name, _) in written.items())

    eventually(refused_by_all_readers, timeout=180, interval=1.0)

    # The treasury's mint is the only money that moved: no forged credit, payout,
    # refund or slash reached the ledger.
    ledger = LedgerProjection(net.pg_dsn)
    try:
        eventually(lambda: ledger.balances().get(user("alice")) == FUNDS, timeout=120,
                   interval=0.5)
        assert dict(ledger.balances()) == {user("alice"): FUNDS, "mint": -FUNDS}
        ledger.check()
    finally:
        ledger.close()
    entries = [decode(m.value()) for m in read_all(
        net.bootstrap, net.settings.topic_prefix + "ledger.entries")]
    genuine = [e for e in entries if net.genesis.check(e) is None]
    assert sorted(e.fields["account"] for e in genuine) == ["mint", user("alice")]

    # No verdict, failure, assignment, reveal call or penalty reached the views.
    views = ViewProjection(net.pg_dsn)
    try:
        assert views.task(TASK) is None
        assert all(n["node_id"] != VICTIM for n in views.nodes())
    finally:
        views.close()
