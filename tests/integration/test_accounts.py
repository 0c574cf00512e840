"""On the real (secured) broker: accounts exist before they are credited, and a stake is
locked only with its operator's consent. The ledger processor refuses, dead-lettering
with the reason, a mint to an unregistered account, a second key for a taken account
and a stake its operator did not sign for; the account's own principal writes its
registration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from destra import keystore
from destra.client import Client
from destra.crypto import KeyPair, sign_event
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from ledger.book import stake, user
from ledger.projection import LedgerProjection
from schemas import Event, decode, new_event
from schemas.bindings import account_registration, sign_stake_consent
from schemas.samples import sample_event, with_fields
from streams.consumer import dead_letter_topic
from streams.producer import EventProducer
from streams.reading import read_all
from streams.security import KafkaAccess
from tests.support import TEARDOWN_GRACE_S, eventually

pytestmark = pytest.mark.integration

FUNDS = 5_000_000
STAKE = 1_000_000


@pytest.fixture
def net(network: Settings, kafka: str, pg_dsn: str, tmp_path: Path) -> Iterator[LocalNetwork]:
    local = LocalNetwork(network.with_(home=tmp_path / "home"), kafka,
                         create_database(pg_dsn), tmp_path / "logs")
    yield local
    local.stop(timeout_s=TEARDOWN_GRACE_S)


def _letters(net: LocalNetwork) -> list[str]:
    return [decode(m.value()).fields["reason"]
            for m in read_all(net.bootstrap, dead_letter_topic(net.settings))]


def _node(name: str, operator: str, consent: bytes) -> Event:
    keys = KeyPair.generate()
    return sign_event(with_fields(sample_event("NodeRegistered"), node_id=name,
                                  operator_id=operator, stake_micro=STAKE,
                                  signing_key=keys.signing_public,
                                  operator_consent=consent), keys, name)


def test_the_ledger_credits_and_stakes_only_registered_consenting_accounts(
        net: LocalNetwork) -> None:
    net.start_services()
    net.mint("op", amount_micro=FUNDS)  # registers op, then mints once the ledger bound it

    # A mint to an account nobody registered: refused, no money moves.
    with EventProducer(net.settings, net.bootstrap, net.credentials("treasury").config(),
                       signer=net.signer("treasury")) as producer:
        producer.send(new_event("TokensMinted", "treasury", account="ghost",
                                amount_micro=FUNDS, reason="test"))

    # The account's own principal writes its registration (its ACL); a second key for a
    # taken id is refused.
    net.create_accounts("alice")
    assert net.access is not None
    alice = (KafkaAccess.load(keystore.account_credentials(net.settings, "alice"))
             if net.access.secure else net.access)
    with EventProducer(net.settings, net.bootstrap, alice.config()) as producer:
        producer.send(account_registration("alice", net.account_keys("alice")))
    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    client.register()  # the same key again: changes nothing, refused nowhere
    client.close()
    with EventProducer(net.settings, net.bootstrap, net.access.config()) as producer:
        producer.send(account_registration("op", KeyPair.generate()))
        # A stranger's node naming op as its operator, without op's consent; and one
        # whose consent op's registered key signed.
        producer.send(_node("stranger-node", "op", b""))
        keys = KeyPair.generate()
        consent = sign_stake_consent(net.account_keys("op"), net.settings.topic_prefix,
                                     "op", "honest-node", keys.signing_public, STAKE)
        producer.send(sign_event(with_fields(
            sample_event("NodeRegistered"), node_id="honest-node", operator_id="op",
            stake_micro=STAKE, signing_key=keys.signing_public, operator_consent=consent),
            keys, "honest-node"))

    def refused() -> bool:
        net.check_alive()
        reasons = _letters(net)
        return all(any(r.startswith(p) for r in reasons) for p in (
            "unregistered-account: mint", "account-taken: account op",
            "no-stake-consent: node stranger-node"))

    eventually(refused, timeout=120, interval=1.0)
    ledger = LedgerProjection(net.pg_dsn)
    try:
        eventually(lambda: ledger.balances().get(stake("honest-node")) == STAKE, timeout=120,
                   interval=0.5)
        balances = dict(ledger.balances())
        assert balances.get(user("ghost"), 0) == 0
        assert balances.get(stake("stranger-node"), 0) == 0
        assert balances[user("op")] == FUNDS - STAKE
        ledger.check()
    finally:
        ledger.close()
    registry = [decode(m.value()) for m in read_all(
        net.bootstrap, net.settings.topic_prefix + "accounts.registry")]
    assert [e.fields["signing_key"] for e in registry if e.fields["account_id"] == "alice"
            ] == [net.account_keys("alice").signing_public] * 2
    assert not any("account alice" in r for r in _letters(net))
