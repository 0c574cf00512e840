"""The governance processor on the in-memory runner: proposals, secret ballots weighted by
stake, the decrypted tally, quorum and threshold, and every refusal with its reason.

The ledger's side (deposit escrow, stake entries) is written here as the ledger writes
it; ``test_governance_economy.py`` runs the real ledger with it.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator

import pytest

from destra.sim import account_registration, keys_for
from governance.ballot import TallyKeyShare, TallyPublicKey, cast, generate_tally_key
from governance.service import Governance
from schemas import Event, new_event
from schemas.bindings import ballot_context
from schemas.signatures import sign_event
from streams.memory import MemoryRunner
from streams.params import DEFAULTS, ParamSchedule

NETWORK = "t."
VOTING_MS = 60_000
STAKES = {"op-a": 5_000_000, "op-b": 3_000_000, "op-c": 2_000_000}
"""Operators and their bonded stake (one node each): 10 tokens in all."""


@pytest.fixture(scope="module")
def tally_key() -> tuple[TallyPublicKey, list[TallyKeyShare]]:
    return generate_tally_key(1024, 3)


@dataclasses.dataclass
class World:
    runner: MemoryRunner
    gov: Governance
    key: TallyPublicKey

    @property
    def now(self) -> int:
        return self.runner.now_ms

    def entries(self, tx: str, legs: dict[str, int], kind: str) -> None:
        """A ledger transaction, one entry per leg (as ``ledger.events`` writes them)."""
        self.runner.publish(*[new_event(
            "LedgerEntryPosted", "ledger", entry_id=f"{tx}#{i}", transaction_id=tx,
            account=account, amount_micro=amount, kind=kind, task_id=None, memo="")
            for i, (account, amount) in enumerate(legs.items())], source="ledger")

    def propose(self, pid: str, parameter: str = "fee_bps", value: str = "200",
                by: str = "op-a", deposit: bool = True) -> None:
        proposal = new_event("ProposalSubmitted", by, occurred_at=self.now, proposal_id=pid,
                             proposer_id=by,
                             title="Lower the fee", description="", parameter=parameter,
                             new_value=value, voting_ends_at=self.now,
                             deposit_micro=DEFAULTS["gov_deposit_micro"])
        self.runner.publish(sign_event(proposal, keys_for(by), by), source=by)
        if deposit:
            self.entries(f"deposit/{pid}", {f"user:{by}": -DEFAULTS["gov_deposit_micro"],
                                            f"deposit:{pid}": DEFAULTS["gov_deposit_micro"]},
                         "deposit")

    def ballot(self, pid: str, voter: str, choice: str, *, ballot: bytes | None = None,
               signer: str | None = None) -> Event:
        if ballot is None:
            ballot = cast(self.key, choice, ballot_context(NETWORK, pid, voter))
        event = new_event("VoteCast", voter, proposal_id=pid, voter_id=voter,
                          choice="ABSTAIN", weight_micro=0, ballot=ballot)
        return sign_event(event, keys_for(signer or voter), signer or voter)

    def vote(self, pid: str, voter: str, choice: str, **kw: object) -> None:
        self.runner.publish(self.ballot(pid, voter, choice, **kw), source=voter)  # type: ignore[arg-type]

    def decisions(self) -> list[dict[str, object]]:
        return [e.fields for e in self.runner.events("ProposalDecided")]

    def refusals(self) -> list[str]:
        return [reason for _, reason in self.runner.dead_letters]


@pytest.fixture
def world(tally_key: tuple[TallyPublicKey, list[TallyKeyShare]]) -> Iterator[World]:
    key, shares = tally_key
    gov = Governance("governance", key, shares, network=NETWORK,
                     params=ParamSchedule({"gov_voting_ms": VOTING_MS}))
    runner = MemoryRunner([gov], tick_ms=1_000)
    w = World(runner, gov, key)
    for account in (*STAKES, "outsider"):
        runner.publish(account_registration(account, w.now))
    for operator, stake in STAKES.items():
        node = f"n-{operator}"
        w.entries(f"stake/{node}", {f"user:{operator}": -stake, f"stake:{node}": stake},
                  "stake")
    yield w


def test_a_proposal_passes_with_secret_ballots_and_changes_the_parameter(world: World) -> None:
    world.propose("p1")
    world.vote("p1", "op-a", "YES")
    world.vote("p1", "op-b", "NO")
    world.vote("p1", "op-c", "YES")
    assert world.decisions() == [] and world.refusals() == []
    # Nothing is decrypted before the close; the running tally is one ciphertext.
    assert isinstance(world.gov.proposals["p1"].tally, int)
    world.runner.advance(VOTING_MS + 2_000)
    [decided] = world.decisions()
    assert decided["outcome"] == "PASSED" and decided["deposit"] == "REFUND"
    assert (decided["yes_micro"], decided["no_micro"], decided["abstain_micro"]) == (
        7_000_000, 3_000_000, 0)
    assert decided["bonded_micro"] == 10_000_000 and decided["ballots"] == 3
    [changed] = world.runner.events("ParameterChanged")
    assert (changed.fields["parameter"], changed.fields["value"]) == ("fee_bps", 200)
    assert world.gov.params.value("fee_bps", world.now) == 200


def test_yes_must_exceed_the_threshold_of_yes_and_no(world: World) -> None:
    world.propose("p1")
    world.vote("p1", "op-a", "NO")      # 5 tokens
    world.vote("p1", "op-b", "YES")     # 3
    world.vote("p1", "op-c", "ABSTAIN")  # 2: counts for quorum, not for the threshold
    world.runner.advance(VOTING_MS + 2_000)
    [decided] = world.decisions()
    assert decided["outcome"] == "REJECTED" and decided["deposit"] == "REFUND"
    assert decided["abstain_micro"] == 2_000_000
    assert world.runner.events("ParameterChanged") == []


def test_a_proposal_without_quorum_fails_and_its_deposit_is_burned(world: World) -> None:
    world.propose("p1")
    world.vote("p1", "op-c", "YES")  # 2 of 10 tokens: below the 33.4 % quorum
    world.runner.advance(VOTING_MS + 2_000)
    [decided] = world.decisions()
    assert decided["outcome"] == "NO_QUORUM" and decided["deposit"] == "BURN"
    assert decided["yes_micro"] == 2_000_000
    assert world.runner.events("ParameterChanged") == []


@pytest.mark.parametrize(("parameter", "value", "why"), [
    ("fee_bps", "9999", "must lie in 0..5000"),
    ("fee_bps", "lots", "takes an integer"),
    ("no_such_parameter", "1", "unknown parameter"),
    ("spot_min_permille", "900", "would exceed spot_max_permille"),
])
def test_a_bad_change_is_decided_invalid_at_once_and_refunded(
        world: World, parameter: str, value: str, why: str) -> None:
    world.propose("p1", parameter, value)
    [decided] = world.decisions()
    assert decided["outcome"] == "INVALID" and decided["deposit"] == "REFUND"
    assert why in str(decided["detail"])
    world.vote("p1", "op-a", "YES")
    assert world.refusals()[-1].startswith("closed")


def test_bad_ballots_are_refused_each_with_its_reason(world: World) -> None:
    world.propose("p1")
    world.vote("p1", "op-a", "YES")
    world.vote("p1", "op-a", "NO")  # a second ballot
    world.vote("p1", "outsider", "YES")  # registered, no stake
    # A valid ballot of op-b's, sent as op-c's: its proof is bound to op-b.
    world.vote("p1", "op-c", "YES", ballot=cast(world.key, "YES",
                                                ballot_context(NETWORK, "p1", "op-b")))
    world.vote("p1", "op-b", "YES", ballot=b"\x00" * 40)  # not a ballot
    forged = bytearray(cast(world.key, "YES", ballot_context(NETWORK, "p1", "op-b")))
    forged[10] ^= 1  # a tampered ciphertext or proof
    world.vote("p1", "op-b", "YES", ballot=bytes(forged))
    world.vote("p1", "op-b", "YES", signer="op-a")  # signed by another account's key
    world.vote("p2", "op-b", "YES")  # no such proposal
    reasons = world.refusals()
    assert [r.split(":")[0] for r in reasons] == [
        "double-vote", "no-stake", "bad-proof", "malformed-ballot",
        reasons[4].split(":")[0], "bad-signature", "unknown-proposal"]
    assert reasons[4].split(":")[0] in ("bad-proof", "invalid-ciphertext", "malformed-ballot")
    # Only op-a's first ballot counts.
    world.runner.advance(VOTING_MS + 2_000)
    [decided] = world.decisions()
    assert decided["ballots"] == 1 and decided["yes_micro"] == 5_000_000


def test_a_ballot_for_an_out_of_range_choice_or_zero_ciphertext_is_refused(world: World) -> None:
    from governance import ballot as b

    world.propose("p1")
    context = ballot_context(NETWORK, "p1", "op-a")
    # A zero ciphertext in place of a real one, the proof kept.
    good = b._parse(cast(world.key, "YES", context))
    zero = bytes([b._BALLOT_VERSION]) + b"".join(b._field(v) for v in [0, *good[1:]])
    world.vote("p1", "op-a", "YES", ballot=zero)
    assert world.refusals()[-1].startswith("invalid-ciphertext")


def test_an_open_vote_or_one_after_the_close_is_refused(world: World) -> None:
    world.propose("p1")
    open_vote = sign_event(new_event("VoteCast", "op-a", proposal_id="p1", voter_id="op-a",
                                     choice="YES", weight_micro=5_000_000, ballot=None),
                           keys_for("op-a"), "op-a")
    world.runner.publish(open_vote)
    assert world.refusals()[-1].startswith("open-vote")
    world.runner.advance(VOTING_MS + 2_000)
    world.vote("p1", "op-b", "YES")
    assert world.refusals()[-1].startswith("closed")


def test_a_ballot_before_the_deposit_is_refused_and_stake_bought_during_the_vote_has_no_weight(
        world: World) -> None:
    world.propose("p1", deposit=False)
    world.vote("p1", "op-a", "YES")
    assert world.refusals()[-1].startswith("not-open")
    world.entries("deposit/p1", {"user:op-a": -DEFAULTS["gov_deposit_micro"],
                                 "deposit:p1": DEFAULTS["gov_deposit_micro"]}, "deposit")
    world.entries("stake/n-outsider", {"user:outsider": -50_000_000,
                                       "stake:n-outsider": 50_000_000}, "stake")
    world.vote("p1", "outsider", "NO")
    assert world.refusals()[-1].startswith("no-stake")


def test_a_restart_mid_vote_decides_the_same(world: World,
                                             tally_key: tuple[TallyPublicKey,
                                                              list[TallyKeyShare]]) -> None:
    world.propose("p1")
    world.vote("p1", "op-a", "YES")
    key, shares = tally_key
    restored = Governance("governance", key, shares, network=NETWORK)
    restored.restore(pickle.loads(pickle.dumps(world.gov.snapshot())))
    world.runner.processors = [restored]
    world.gov = restored
    world.vote("p1", "op-a", "NO")
    assert world.refusals()[-1].startswith("double-vote")
    world.vote("p1", "op-b", "NO")
    world.runner.advance(VOTING_MS + 2_000)
    [decided] = world.decisions()
    assert (decided["yes_micro"], decided["no_micro"]) == (5_000_000, 3_000_000)
    assert decided["outcome"] == "PASSED"


def test_a_proposal_replayed_after_its_freshness_is_refused(world: World) -> None:
    by = "op-a"
    old = sign_event(new_event("ProposalSubmitted", by, occurred_at=world.now - 600_001,
                               proposal_id="p-old", proposer_id=by, title="t", description="",
                               parameter="fee_bps", new_value="200", voting_ends_at=0,
                               deposit_micro=DEFAULTS["gov_deposit_micro"]), keys_for(by), by)
    world.runner.publish(old)
    assert world.refusals()[-1].startswith("stale-proposal")
    assert "p-old" not in world.gov.proposals
