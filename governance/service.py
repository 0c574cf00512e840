"""The governance processor: proposals, secret ballots, stake-weighted tallies, parameter changes.

Behind the processing contract (``streams.processing``), run in the processors
worker's allocator unit, its outputs signed with the ``governance`` role's key.

The life of a proposal:

1. A registered account signs a ``ProposalSubmitted``: a live parameter
   (``streams.params``), its new value, a deposit. The ledger escrows the deposit
   (``deposit:<proposal>``) or dead-letters the proposal with the reason; this
   processor checks the parameter and the value against the values in force and
   decides a bad one ``INVALID`` at once (deposit refunded).
2. The ledger's ``deposit/<proposal>`` entry opens the ballot. Voting power is
   frozen then: each operator's bonded stake (the ``stake:<node>`` balances of the
   nodes it staked, from the ledger's entries alone), so stake bought during the
   vote does not count. The ballot stays open for ``gov_voting_ms`` (in force at
   opening), or until the proposal's own ``voting_ends_at`` if that is later.
3. Stakers send ``VoteCast`` with a secret ballot (``governance.ballot``): one
   Paillier ciphertext of their choice and a proof that it encrypts exactly one of
   yes, no, abstain, bound to the network, the proposal and the voter. Each valid
   ballot is multiplied into the running tally raised to the voter's weight; no
   ballot is ever decrypted. Refused, each with its reason (dead-lettered):
   ``unknown-proposal``, ``not-open``, ``closed`` (appended after the close, by
   broker time), ``bad-signature``, ``unregistered-account``, ``no-stake``,
   ``double-vote``, ``open-vote`` (no ballot), and the ballot's own
   ``malformed-ballot``, ``invalid-ciphertext``, ``bad-proof``.
4. At the close (a tick past ``ends_at``) only the tally is decrypted, by
   combining the trustees' partial decryptions. Quorum: the stake that voted, at
   least ``gov_quorum_permille`` of the bonded stake. Threshold: yes above
   ``gov_threshold_permille`` of yes + no. ``PASSED`` emits ``ParameterChanged``
   (effective at once) and refunds the deposit; ``REJECTED`` refunds it;
   ``NO_QUORUM`` burns it (a proposal nobody cared to vote on cost the network
   attention); the ledger moves the deposit as ``ProposalDecided.deposit`` says.

The tally key. Its decryption exponent is split n-of-n among trustees
(``governance.ballot``); in this release every share sits in the governance
service's key folder, so whoever holds that folder can decrypt any single ballot
read from the topic, exactly as a holder of the whole key could. Running each
trustee as its own process, publishing partial decryptions only of closed tallies,
is the step that makes the split count; see DESIGN.md, Governance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from governance.ballot import (
    SLOT,
    InvalidBallot,
    TallyKeyShare,
    TallyPublicKey,
    accumulate,
    check_ballot,
    decrypt_sums,
)
from ledger.decider import MAX_SUBMISSION_AGE_MS, proposal_staleness
from schemas import Event, new_event
from schemas.bindings import ballot_context
from schemas.signatures import verify_event
from streams.params import ParamSchedule, parse_value
from streams.processing import Context, Outcome, Recovery

PERMILLE = 1_000
PENDING_MS = MAX_SUBMISSION_AGE_MS
"""How long a proposal waits for its deposit before it is forgotten (the ledger refused it):
as long as the ledger would still take a copy of it (``proposal_staleness``)."""


@dataclass
class Proposal:
    """One proposal, from its submission to its decision."""

    proposal_id: str
    proposer: str
    parameter: str
    value: int
    title: str
    submitted_at: int
    asked_end: int
    """The proposal's own ``voting_ends_at``."""
    opened_at: int | None = None
    ends_at: int | None = None
    weights: dict[str, int] = field(default_factory=dict)
    """Each operator's bonded stake when the ballot opened: its voting power."""
    bonded: int = 0
    tally: int | None = None
    """The running product of the ballots raised to their weights (a Paillier ciphertext)."""
    voters: set[str] = field(default_factory=set)
    decided: str | None = None


@dataclass
class Governance:
    """Folds proposals, ballots and the ledger's stake entries; decides at each close."""

    producer_id: str
    key: TallyPublicKey
    shares: Sequence[TallyKeyShare]
    network: str = ""
    """The network's name (topic prefix): a ballot counts on its network only."""
    params: ParamSchedule = field(default_factory=ParamSchedule)
    proposals: dict[str, Proposal] = field(default_factory=dict)
    account_keys: dict[str, bytes] = field(default_factory=dict)
    stakes: dict[str, int] = field(default_factory=dict)
    """``stake:<node>`` balances, by node."""
    operators: dict[str, str] = field(default_factory=dict)
    """Node -> the operator whose account staked it (the user leg of its stake transaction)."""
    _legs: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    """Stake transactions seen by one leg only: (node, operator); the other leg is on
    another partition of the entries topic and may come later."""

    name = "governance"
    inputs = frozenset({"ProposalSubmitted", "VoteCast", "LedgerEntryPosted",
                        "AccountRegistered", "ParameterChanged"})
    recovery = Recovery.SNAPSHOT

    _SNAPSHOT_FIELDS = ("proposals", "account_keys", "stakes", "operators", "_legs")

    def snapshot(self) -> dict[str, Any]:
        """Everything: bounded by proposals, accounts and nodes, not by tasks."""
        return {**{n: getattr(self, n) for n in self._SNAPSHOT_FIELDS},
                "params": self.params.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Take over a state ``snapshot`` returned."""
        for name in self._SNAPSHOT_FIELDS:
            setattr(self, name, state[name])
        self.params = ParamSchedule.load(state["params"])

    def wants(self, event: Event) -> bool:
        """Of the ledger's entries only stakes and deposits matter here."""
        if event.name != "LedgerEntryPosted":
            return True
        f = event.fields
        return (f["account"].startswith(("stake:", "deposit:"))
                or (f["kind"] == "stake" and f["account"].startswith("user:")))

    def handle(self, event: Event, ctx: Context) -> Outcome:
        """One input at its record time (broker time on the governance topic)."""
        handler = getattr(self, f"_on_{event.name}")
        return handler(event, ctx.now_ms)  # type: ignore[no-any-return]

    # -- inputs ------------------------------------------------------------------------------

    def _on_AccountRegistered(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        if verify_event(e, f["signing_key"], f["account_id"]):
            self.account_keys.setdefault(f["account_id"], f["signing_key"])
        return Outcome()

    def _on_ParameterChanged(self, e: Event, at: int) -> Outcome:  # noqa: N802
        refusal = self.params.follow(e)
        return Outcome.refuse(e, refusal) if refusal else Outcome()

    def _signed_by_account(self, e: Event, account: str) -> str | None:
        key = self.account_keys.get(account)
        if key is None:
            return f"unregistered-account: {account} is not a registered account"
        if not verify_event(e, key, account):
            return f"bad-signature: not signed by {account}'s registered key"
        return None

    def _on_ProposalSubmitted(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        pid = f["proposal_id"]
        if pid in self.proposals:
            return Outcome.refuse(e, f"duplicate-proposal: {pid} was submitted before")
        stale = proposal_staleness(e, at)
        if stale is not None:
            return Outcome.refuse(e, stale)
        refusal = self._signed_by_account(e, f["proposer_id"])
        if refusal is not None:
            return Outcome.refuse(e, refusal)  # the ledger took no deposit either
        proposal = Proposal(pid, f["proposer_id"], f["parameter"], 0, f["title"], at,
                            f["voting_ends_at"])
        self.proposals[pid] = proposal
        try:
            proposal.value = parse_value(f["parameter"], f["new_value"])
        except ValueError as err:
            return Outcome.of(self._decide(proposal, at, "INVALID", "REFUND", str(err)))
        conflict = self.params.at(at).conflict(proposal.parameter, proposal.value)
        if conflict is not None:
            return Outcome.of(self._decide(proposal, at, "INVALID", "REFUND", conflict))
        return Outcome()

    def _on_LedgerEntryPosted(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        account, amount, tx = f["account"], f["amount_micro"], f["transaction_id"]
        kind, _, ref = account.partition(":")
        if kind == "deposit" and tx == f"deposit/{ref}" and amount > 0:
            return Outcome.of(self._open(ref, at))
        if kind == "stake":
            self.stakes[ref] = self.stakes.get(ref, 0) + amount
            if f["kind"] == "stake" and amount > 0 and ref not in self.operators:
                self._leg(tx, node=ref)
        elif kind == "user" and amount < 0:
            self._leg(tx, operator=ref)
        return Outcome()

    def _leg(self, tx: str, node: str | None = None, operator: str | None = None) -> None:
        """One leg of a stake transaction; with both, the node's operator is known."""
        seen_node, seen_operator = self._legs.pop(tx, (None, None))
        node, operator = node or seen_node, operator or seen_operator
        if node is not None and operator is not None:
            self.operators.setdefault(node, operator)
        else:
            self._legs[tx] = (node, operator)

    def _open(self, pid: str, at: int) -> list[Event]:
        proposal = self.proposals.get(pid)
        if proposal is None or proposal.opened_at is not None or proposal.decided:
            return []
        weights: dict[str, int] = {}
        for node, staked in self.stakes.items():
            operator = self.operators.get(node)
            if operator is not None and staked > 0:
                weights[operator] = weights.get(operator, 0) + staked
        proposal.opened_at, proposal.weights = at, weights
        proposal.bonded = sum(weights.values())
        proposal.ends_at = max(proposal.asked_end, at + self.params.value("gov_voting_ms", at))
        if proposal.bonded >= SLOT:  # the sums would carry between the tally's slots
            return self._decide(proposal, at, "INVALID", "REFUND",
                                f"{proposal.bonded} bonded does not fit a tally slot")
        return []

    def _on_VoteCast(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        pid, voter = f["proposal_id"], f["voter_id"]
        proposal = self.proposals.get(pid)
        if proposal is None:
            return Outcome.refuse(e, f"unknown-proposal: {pid}")
        if proposal.decided is not None or (proposal.ends_at is not None
                                            and at > proposal.ends_at):
            return Outcome.refuse(e, f"closed: voting on {pid} closed at {proposal.ends_at}, "
                                     f"ballot appended at {at}")
        if proposal.opened_at is None:
            return Outcome.refuse(e, f"not-open: {pid} has no deposit escrowed yet")
        refusal = self._signed_by_account(e, voter)
        if refusal is not None:
            return Outcome.refuse(e, refusal)
        weight = proposal.weights.get(voter, 0)
        if weight <= 0:
            return Outcome.refuse(e, f"no-stake: {voter} had no bonded stake when {pid} "
                                     "opened")
        if voter in proposal.voters:
            return Outcome.refuse(e, f"double-vote: {voter} already voted on {pid}")
        if f["ballot"] is None:
            return Outcome.refuse(e, "open-vote: ballots are secret; send an encrypted "
                                     "ballot (destra gov vote)")
        try:
            ciphertext = check_ballot(self.key, f["ballot"],
                                      ballot_context(self.network, pid, voter))
        except InvalidBallot as err:
            return Outcome.refuse(e, str(err))
        proposal.tally = accumulate(self.key, proposal.tally, ciphertext, weight)
        proposal.voters.add(voter)
        return Outcome()

    # -- time --------------------------------------------------------------------------------

    def tick(self, ctx: Context) -> Outcome:
        """Close every ballot past its end; forget proposals the ledger never opened."""
        out: list[Event] = []
        now = ctx.now_ms
        for pid, p in list(self.proposals.items()):
            if p.decided is None and p.ends_at is not None and now > p.ends_at:
                out += self._close(p, now)
            elif p.decided is None and p.opened_at is None and now > p.submitted_at + PENDING_MS:
                del self.proposals[pid]  # refused by the ledger: no deposit, no ballot
        return Outcome.of(out)

    def _close(self, p: Proposal, now: int) -> list[Event]:
        yes = no = abstain = 0
        if p.tally is not None:
            yes, no, abstain = decrypt_sums(self.key, self.shares, p.tally)
        params = self.params.at(now)
        voted = yes + no + abstain
        sums = dict(yes_micro=yes, no_micro=no, abstain_micro=abstain)
        turnout = (f"{voted} of {p.bonded} bonded voted"
                   f" ({voted * 100 / p.bonded:.1f}%)" if p.bonded else "nothing bonded")
        if p.bonded == 0 or voted * PERMILLE < params["gov_quorum_permille"] * p.bonded:
            return self._decide(p, now, "NO_QUORUM", "BURN",
                                f"{turnout}, quorum {params['gov_quorum_permille'] / 10}%",
                                **sums)
        share = f"yes {yes} of yes + no {yes + no}"
        if yes * PERMILLE <= params["gov_threshold_permille"] * (yes + no):
            return self._decide(p, now, "REJECTED", "REFUND",
                                f"{share}, threshold {params['gov_threshold_permille'] / 10}%",
                                **sums)
        conflict = params.conflict(p.parameter, p.value)
        if conflict is not None:  # another change passed in between
            return self._decide(p, now, "INVALID", "REFUND", conflict, **sums)
        changed = new_event("ParameterChanged", self.producer_id, parameter=p.parameter,
                            value=p.value, effective_at=now, proposal_id=p.proposal_id)
        self.params.apply(p.parameter, p.value, now)  # as it reads back its own output
        return [changed, *self._decide(p, now, "PASSED", "REFUND",
                                       f"{share}; {turnout}; {p.parameter} = {p.value}",
                                       **sums)]

    def _decide(self, p: Proposal, now: int, outcome: str, deposit: str, detail: str,
                yes_micro: int = 0, no_micro: int = 0, abstain_micro: int = 0) -> list[Event]:
        p.decided = outcome
        p.tally = None  # decided: the ciphertext is no longer needed
        return [new_event("ProposalDecided", self.producer_id, proposal_id=p.proposal_id,
                          outcome=outcome, yes_micro=yes_micro, no_micro=no_micro,
                          abstain_micro=abstain_micro, bonded_micro=p.bonded,
                          ballots=len(p.voters), deposit=deposit, detail=detail[:2000])]
