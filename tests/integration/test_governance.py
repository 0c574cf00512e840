"""Governance on a live network (real broker, ledger, processors, node runners, Postgres):
stakers vote by secret ballot, the passed fee change applies to the next settlement, a
proposal without quorum fails and its deposit is burned, and bad ballots are refused,
each with its reason (``governance.service``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from destra.client import Client
from destra.governance_client import ballot_event, proposals, propose, vote
from destra.network import LocalNetwork
from destra.settings import Settings
from governance.ballot import cast
from governance.keys import load_tally_key
from schemas import Event
from schemas.bindings import ballot_context
from streams.params import DEFAULTS
from tests.support import network_balances, running_network

pytestmark = pytest.mark.integration

STAKES = {"n0": 5_000_000, "n1": 3_000_000, "n2": 2_000_000}
"""Each node's stake, locked from its operator ``op-<node>``: 10 tokens bonded in all."""
DEPOSIT = 1_000_000
VOTING_MS = 12_000
NEW_FEE_BPS = 100


@pytest.fixture
def gov_net(network: Settings, kafka: str, pg_dsn: str,
            tmp_path: Path) -> Iterator[LocalNetwork]:
    """Ballots stay open 12 s; a proposal's deposit is 1 token."""
    with running_network(network.with_(home=tmp_path / "home"), kafka, pg_dsn, tmp_path, {
            "DESTRA_PARAM_GOV_VOTING_MS": str(VOTING_MS),
            "DESTRA_PARAM_GOV_DEPOSIT_MICRO": str(DEPOSIT)}) as net:
        yield net


def _until(check: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _decided(net: LocalNetwork, pid: str) -> Event | None:
    return next((e for e in net.events("ProposalDecided")
                 if e.fields["proposal_id"] == pid), None)


def _refusals(net: LocalNetwork) -> list[str]:
    return [e.fields["reason"] for e in net.events("DeadLettered")
            if e.fields["source_topic"].endswith("governance")]


def test_stakers_change_the_fee_by_secret_ballot_and_bad_ballots_are_refused(
        gov_net: LocalNetwork) -> None:
    net = gov_net
    operators = [f"op-{n}" for n in STAKES]
    net.mint("alice", "eve", *operators, amount_micro=100_000_000)
    net.start_services()
    for n, stake in STAKES.items():
        net.start_node(n, operator=f"op-{n}", stake_micro=stake)
    net.wait_registered(list(STAKES))
    _until(lambda: all(network_balances(net).get(f"stake:{n}") == s
                       for n, s in STAKES.items()), 60, "the stakes")
    clients = {a: Client(net.settings, net.bootstrap, a, net.passphrase)
               for a in ("alice", "eve", *operators)}
    try:
        fee = propose(clients["op-n0"], "fee_bps", str(NEW_FEE_BPS), "Lower the fee to 1%",
                      deposit_micro=DEPOSIT)
        idle = propose(clients["op-n2"], "slash_no_show_micro", "50000", "Gentler no-shows",
                       deposit_micro=DEPOSIT)
        # The ballots open once the ledger escrows the deposits.
        _until(lambda: network_balances(net).get(f"deposit:{fee}") == DEPOSIT
               and network_balances(net).get(f"deposit:{idle}") == DEPOSIT, 60, "deposits")
        time.sleep(1)  # the governance processor reads the deposit entries
        # Refused, each with its reason (op-n1's real ballot comes after its bad ones).
        key = load_tally_key(net.settings.genesis_path)
        copied = cast(key, "YES", ballot_context(net.settings.topic_prefix, fee, "op-n0"))
        forged = ballot_event(clients["op-n1"], fee, "yes")
        forged.fields["ballot"] = copied  # op-n0's proof, sent as op-n1's
        clients["op-n1"].send_signed(forged)
        garbage = ballot_event(clients["op-n1"], fee, "yes")
        garbage.fields["ballot"] = b"\x01" + b"\x00\x01\x00" * 10  # ciphertext 0, no proof
        clients["op-n1"].send_signed(garbage)
        vote(clients["eve"], fee, "yes")   # registered and funded, but no stake

        vote(clients["op-n0"], fee, "yes")   # 5 tokens
        vote(clients["op-n1"], fee, "no")    # 3 tokens
        vote(clients["op-n2"], fee, "yes")   # 2 tokens
        vote(clients["op-n2"], idle, "yes")  # 2 of 10 tokens: no quorum
        # A second ballot: refused, and the voter told so.
        refused = vote(clients["op-n0"], fee, "no", wait_s=30)
        assert refused is not None and refused.startswith("double-vote"), refused

        _until(lambda: _decided(net, fee) and _decided(net, idle), VOTING_MS / 1000 + 60,
               "both decisions")
        passed, failed = _decided(net, fee), _decided(net, idle)
        assert passed is not None and failed is not None
        p = passed.fields
        assert (p["outcome"], p["deposit"]) == ("PASSED", "REFUND"), p["detail"]
        assert (p["yes_micro"], p["no_micro"], p["abstain_micro"], p["bonded_micro"],
                p["ballots"]) == (7_000_000, 3_000_000, 0, 10_000_000, 3)
        f = failed.fields
        assert (f["outcome"], f["deposit"], f["yes_micro"]) == ("NO_QUORUM", "BURN", 2_000_000)
        [changed] = net.events("ParameterChanged")
        assert changed.signer == "governance"
        assert (changed.fields["parameter"], changed.fields["value"]) == ("fee_bps",
                                                                          NEW_FEE_BPS)
        reasons = sorted(r.split(":")[0] for r in _refusals(net))
        assert reasons == ["bad-proof", "double-vote", "invalid-ciphertext", "no-stake"], (
            _refusals(net))
        listed = {x["proposal_id"]: x for x in proposals(clients["alice"])}
        assert listed[fee]["state"] == "passed" and listed[idle]["state"] == "no_quorum"

        # The deposits: one refunded, one burned.
        _until(lambda: network_balances(net).get("burned") == DEPOSIT, 30, "the burn")
        books = network_balances(net)
        assert books.get(f"deposit:{fee}", 0) == 0 and books.get(f"deposit:{idle}", 0) == 0

        # The next settlement pays the new fee.
        alice = clients["alice"]
        task = alice.submit(alice.quote("matmul", {"n": "512", "seed": "7"}))
        done = alice.wait([task], timeout_s=120)[task].as_dict()
        assert done["state"] == "verified", done
        _until(lambda: any(e.fields["transaction_id"] == f"settle/{task}"
                           for e in net.events("LedgerEntryPosted")), 30, "the settlement")
        entries = [e.fields for e in net.events("LedgerEntryPosted")]
        escrowed = next(e["amount_micro"] for e in entries
                        if e["transaction_id"] == f"escrow/{task}" and e["amount_micro"] > 0)
        settle = [e for e in entries if e["transaction_id"] == f"settle/{task}"]
        fee_taken = sum(e["amount_micro"] for e in settle if e["kind"] == "fee")
        units = alice.quote("matmul", {"n": "512", "seed": "7"}).quote.compute_units
        budget = units * 3
        gross = [escrowed * c["compute_units"] // budget for c in done["contributions"]
                 if c["agreed"]]
        assert fee_taken == sum(g * NEW_FEE_BPS // 10_000 for g in gross) > 0
        assert fee_taken != sum(g * DEFAULTS["fee_bps"] // 10_000 for g in gross)
        net.check_alive()
    finally:
        for c in clients.values():
            c.close()
