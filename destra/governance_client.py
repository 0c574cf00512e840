"""An account's side of governance: propose a parameter change, cast a secret ballot, read
the proposals and the live parameters.

A ballot is encrypted on this machine to the network's tally key (``tally.json``
beside ``genesis.json``) with a proof that it holds one valid choice, bound to the
network, the proposal and this account (``governance.ballot``); the governance
processor only ever decrypts the stake-weighted sum at the close. The choice never
leaves this process in the clear: ``VoteCast.choice`` says ABSTAIN for every secret
ballot.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from destra.client import Client
from destra.errors import InvalidRequest
from governance.ballot import CHOICES, cast
from governance.keys import load_tally_key
from schemas import Event, new_event
from schemas.bindings import ballot_context
from schemas.events import now_ms
from streams.params import ParamSchedule, parse_value


def network_params(client: Client) -> ParamSchedule:
    """The live parameters: defaults, then every governance-signed ``ParameterChanged``."""
    return client.network_params()


def propose(client: Client, parameter: str, value: str, title: str, description: str = "",
            *, deposit_micro: int | None = None, voting_ms: int = 0) -> str:
    """Send a signed ``ProposalSubmitted``; its proposal id. The deposit defaults to the
    network's ``gov_deposit_micro``; the ballot stays open ``gov_voting_ms`` from when the
    ledger takes it, or ``voting_ms`` from now if that is later."""
    try:
        parse_value(parameter, value)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    now = now_ms()
    if deposit_micro is None:
        deposit_micro = network_params(client).value("gov_deposit_micro", now)
    proposal_id = f"prop-{uuid.uuid4().hex[:16]}"
    client.send_signed(new_event(
        "ProposalSubmitted", client.account, proposal_id=proposal_id, proposer_id=client.account,
        title=title, description=description, parameter=parameter, new_value=value,
        voting_ends_at=now + voting_ms, deposit_micro=deposit_micro))
    return proposal_id


def ballot_event(client: Client, proposal_id: str, choice: str) -> Event:
    """The ``VoteCast`` carrying this account's secret ballot (unsigned; ``vote`` signs)."""
    choice = choice.upper()
    if choice not in CHOICES:
        raise InvalidRequest(f"choice {choice!r}: one of {', '.join(CHOICES)}")
    key = load_tally_key(client.settings.genesis_path)
    ballot = cast(key, choice, ballot_context(client.settings.topic_prefix, proposal_id,
                                              client.account))
    return new_event("VoteCast", client.account, proposal_id=proposal_id,
                     voter_id=client.account, choice="ABSTAIN", weight_micro=0, ballot=ballot)


def vote(client: Client, proposal_id: str, choice: str, *,
         wait_s: float = 0.0) -> str | None:
    """Cast this account's secret ballot on ``proposal_id``. With ``wait_s``, watch the
    dead letters that long: the refusal's reason (a second ballot, no stake, a closed
    ballot...), or None when none came (governance says nothing of a ballot it takes:
    its weight is counted, secretly, at the close)."""
    from ledger.processor import ledger_outcome, outcome_positions

    since = outcome_positions(client.settings, client.bootstrap) if wait_s > 0 else {}
    ballot = ballot_event(client, proposal_id, choice)
    client.send_signed(ballot)  # signed as sent: the same event id
    if wait_s <= 0:
        return None
    # No ledger transaction answers a ballot: only a dead letter can come back.
    outcome, reason = ledger_outcome(client.settings, client.bootstrap, client.genesis, "",
                                     "VoteCast", ballot.event_id, since, wait_s)
    return reason if outcome == "refused" else None


def proposals(client: Client) -> list[dict[str, Any]]:
    """Every proposal on the network with its ballots sent and, once closed, its decision
    (the governance-signed ``ProposalDecided``), oldest first."""
    return fold_proposals(client.read_events("ProposalSubmitted"))


def fold_proposals(events: Iterable[Event]) -> list[dict[str, Any]]:
    """``proposals`` from the ``governance`` topic's events already read (and checked
    against the genesis), in log order: the dashboard folds what it follows live."""
    out: dict[str, dict[str, Any]] = {}
    ballots: dict[str, set[str]] = {}
    for event in events:
        f = event.fields
        if event.name == "ProposalSubmitted" and f["proposal_id"] not in out:
            out[f["proposal_id"]] = {
                "proposal_id": f["proposal_id"], "proposer": f["proposer_id"],
                "title": f["title"], "description": f["description"],
                "parameter": f["parameter"], "value": f["new_value"],
                "deposit_micro": f["deposit_micro"], "submitted_at": event.occurred_at,
                "state": "open", "ballots_sent": 0}
        elif event.name == "VoteCast":
            ballots.setdefault(f["proposal_id"], set()).add(f["voter_id"])
        elif event.name == "ProposalDecided" and f["proposal_id"] in out:
            out[f["proposal_id"]].update(
                state=str(f["outcome"]).lower(), yes_micro=f["yes_micro"],
                no_micro=f["no_micro"], abstain_micro=f["abstain_micro"],
                bonded_micro=f["bonded_micro"], ballots_counted=f["ballots"],
                deposit=str(f["deposit"]).lower(), detail=f["detail"],
                decided_at=event.occurred_at)
    for pid, voters in ballots.items():
        if pid in out:
            out[pid]["ballots_sent"] = len(voters)
    return list(out.values())
