"""On the real broker and Postgres: accounts move their own tokens. A transfer (through
`destra transfer`, as the account's own principal), a stake on a node the account
operates, an unstake that waits out its unbonding period, a slash during that period,
a withdrawal before and after it, a replayed operation refused, the ledger processor
SIGKILLed and rebuilt between them; the Postgres ledger shows the exact balances and a
replay from offset 0 gives the same ledger."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from destra.client import Client
from destra.crypto import KeyPair, sign_event
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from ledger.book import TREASURY, stake, unbonding, user
from ledger.processor import ledger_outcome, outcome_positions, wait_for_transactions
from ledger.projection import LedgerProjection
from ledger.service import replay
from schemas import new_event
from schemas.bindings import account_operation, sign_stake_consent
from schemas.samples import sample_event, with_fields
from streams.producer import EventProducer
from tests.support import TEARDOWN_GRACE_S, eventually

pytestmark = pytest.mark.integration

FUNDS = 10_000_000
STAKE = 4_000_000
UNBONDING_MS = 10_000


@pytest.fixture
def net(network: Settings, kafka: str, pg_dsn: str, tmp_path: Path) -> Iterator[LocalNetwork]:
    local = LocalNetwork(network.with_(home=tmp_path / "home"), kafka,
                         create_database(pg_dsn), tmp_path / "logs",
                         env_extra={"DESTRA_PARAM_UNBONDING_MS": str(UNBONDING_MS),
                                    "DESTRA_LEDGER_CHECKPOINT_S": "1"})
    yield local
    local.stop(timeout_s=TEARDOWN_GRACE_S)


def _balances(net: LocalNetwork) -> dict[str, int]:
    ledger = LedgerProjection(net.pg_dsn)
    try:
        return dict(ledger.balances())
    finally:
        ledger.close()


def _settled(net: LocalNetwork, expected: dict[str, int]) -> None:
    def check() -> bool:
        net.check_alive()
        have = _balances(net)
        return all(have.get(a, 0) == v for a, v in expected.items())

    try:
        eventually(check, timeout=120, interval=0.5)
    except AssertionError:
        raise AssertionError(f"balances {_balances(net)}, expected {expected}") from None


def test_transfer_stake_unstake_slash_and_withdraw_end_in_exact_balances(
        net: LocalNetwork) -> None:
    net.spawn("ledger-processor", "-m", "ledger.processor")
    net.spawn("projector", "-m", "ledger.service")
    net.mint("alice", "bob", "op", amount_micro=FUNDS)
    _settled(net, {user("alice"): FUNDS, user("bob"): FUNDS, user("op"): FUNDS})

    # op's node n1, staked at registration with op's consent.
    assert net.access is not None
    keys = KeyPair.generate()
    consent = sign_stake_consent(net.account_keys("op"), net.settings.topic_prefix, "op",
                                 "n1", keys.signing_public, STAKE)
    with EventProducer(net.settings, net.bootstrap, net.access.config()) as producer:
        producer.send(sign_event(with_fields(
            sample_event("NodeRegistered"), node_id="n1", operator_id="op",
            stake_micro=STAKE, signing_key=keys.signing_public, operator_consent=consent),
            keys, "n1"))
    _settled(net, {stake("n1"): STAKE, user("op"): FUNDS - STAKE})

    # A transfer through the CLI, as alice's own principal.
    done = subprocess.run([sys.executable, "-m", "destra", "transfer", "bob", "1000000",
                           "--account", "alice", "--memo", "rent", "--json"],
                          env=net.env(), text=True, capture_output=True, timeout=180,
                          check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["outcome"] == "posted" and answer["transaction_id"].startswith("op/alice/")

    op = Client(net.settings, net.bootstrap, "op", net.passphrase)
    try:
        assert op.stake("n1", 1_000_000).outcome == "posted"
        unstaked = op.unstake("n1", 2_000_000)
        assert unstaked.outcome == "posted", unstaked
        early = op.withdraw("n1")
        assert early.outcome == "refused" and early.reason is not None
        assert early.reason.startswith("still-bonding: "), early.reason
        refused = op.transfer("alice", 10**12)  # takes its nonce, refused
        assert refused.outcome == "refused", refused
        assert refused.reason is not None and refused.reason.startswith("insufficient-funds")

        # SIGKILL the ledger: its rebuild must bring back the nonces, the node's operator
        # and the unbonding tranche (from its checkpoint and the entries after it).
        net.kill("ledger-processor", signal.SIGKILL)
        net.spawn("ledger-processor", "-m", "ledger.processor")

        # A slash during the unbonding: the stake first (3,000,000), then the unbonding.
        with EventProducer(net.settings, net.bootstrap, net.access.config(),
                           signer=net.signer("verifier")) as producer:
            penalty = new_event("NodePenalized", "verifier", node_id="n1", task_id="t-money",
                                reason="dissent", slash_micro=3_500_000, reputation_permille=0)
            producer.send(penalty)
        wait_for_transactions(net.settings, net.bootstrap, [f"slash/{penalty.event_id}"])

        # The refused transfer replayed byte for byte: its nonce was taken, so it is
        # refused again (replay), though op could pay a smaller one now.
        replayed = account_operation("op", net.account_keys("op"), refused.nonce, "TRANSFER",
                                     "alice", 1)
        since = outcome_positions(net.settings, net.bootstrap)
        with EventProducer(net.settings, net.bootstrap, net.access.config()) as producer:
            producer.send(replayed)
        outcome, why = ledger_outcome(net.settings, net.bootstrap, op.genesis,
                                      f"op/op/{refused.nonce}", "AccountOperation",
                                      replayed.event_id, since, 60)
        assert outcome == "refused" and why is not None and why.startswith("replay: "), why

        # Once the unbonding period has passed, the rest of the unbonding is withdrawable.
        time.sleep(max(0.0, UNBONDING_MS / 1000 - (time.time() * 1000 - unstaked.nonce) / 1000)
                   + 1.0)
        late = op.withdraw("n1")
        assert late.outcome == "posted", late
    finally:
        op.close()

    expected = {user("alice"): FUNDS - 1_000_000, user("bob"): FUNDS + 1_000_000,
                user("op"): FUNDS - STAKE - 1_000_000 + 1_500_000,
                stake("n1"): 0, unbonding("n1"): 0, TREASURY: 3_500_000,
                "mint": -3 * FUNDS}
    _settled(net, expected)
    ledger = LedgerProjection(net.pg_dsn)
    try:
        ledger.check()
    finally:
        ledger.close()
    report = replay(net.settings, net.bootstrap, net.pg_dsn)
    assert report.matches, report
