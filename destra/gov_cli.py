"""``destra gov``: propose a live-parameter change, vote by secret ballot, list and show
proposals, and the parameters in force. ``destra.cli`` registers the group."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from destra.cli_common import emit, kafka_address, load_settings, passphrase, settings_options
from destra.errors import DestraError
from streams.params import PARAMS

_account = click.option("--account", envvar="DESTRA_ACCOUNT", default="default",
                        show_default=True, help="The account (env DESTRA_ACCOUNT).")
_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@contextmanager
def _client(account: str, flags: dict[str, Any]) -> Iterator[Any]:
    from destra.client import Client
    from infra import services

    settings = load_settings(**flags)
    client = Client(settings, kafka_address(settings, services, account=account), account,
                    passphrase())
    try:
        yield client
    finally:
        client.close()


@click.group()
def gov() -> None:
    """Governance: stake-weighted proposals with secret ballots."""


@gov.command("propose")
@settings_options
@click.argument("parameter", type=click.Choice(sorted(PARAMS)), metavar="PARAMETER")
@click.argument("value")
@click.option("--title", required=True, help="One line.")
@click.option("--description", default="", help="The case for the change.")
@click.option("--deposit", "deposit_micro", type=click.IntRange(min=0), default=None,
              help="Micro-tokens to escrow (default: the network's gov_deposit_micro).")
@click.option("--voting-ms", type=click.IntRange(min=0), default=0,
              help="Keep the ballot open at least this long (default: gov_voting_ms).")
@_account
@_json
def gov_propose(parameter: str, value: str, title: str, description: str,
                deposit_micro: int | None, voting_ms: int, account: str, as_json: bool,
                **flags: Any) -> None:
    """Propose setting PARAMETER (see `destra gov params`) to VALUE."""
    from destra.governance_client import propose

    with _client(account, flags) as client:
        pid = propose(client, parameter, value, title, description,
                      deposit_micro=deposit_micro, voting_ms=voting_ms)
    emit({"proposal_id": pid, "parameter": parameter, "value": value}, as_json,
         lambda d: f"proposed {d['proposal_id']}: {parameter} = {value} (the ballot opens "
                   "once the ledger escrows the deposit)")


@gov.command("vote")
@settings_options
@click.argument("proposal_id")
@click.argument("choice", type=click.Choice(["yes", "no", "abstain"], case_sensitive=False))
@click.option("--wait", "wait_s", type=float, default=10.0, show_default=True,
              help="Seconds to watch for a refusal (0: do not wait).")
@_account
@_json
def gov_vote(proposal_id: str, choice: str, wait_s: float, account: str, as_json: bool,
             **flags: Any) -> None:
    """Cast a secret ballot: CHOICE is encrypted here to the network's tally key, with a
    proof that it is one valid choice; only the stake-weighted sum is ever decrypted.
    Exits 1 if the ballot is refused (a second ballot, no stake, closed...)."""
    from destra.governance_client import vote

    with _client(account, flags) as client:
        refused = vote(client, proposal_id, choice, wait_s=wait_s)
    emit({"proposal_id": proposal_id, "sent": True, "refused": refused}, as_json,
         lambda d: f"secret ballot on {proposal_id} refused: {refused}" if refused else
         f"secret ballot sent on {proposal_id}" + (f", no refusal in {wait_s:g} s"
                                                   if wait_s > 0 else "")
         + "; weighed by your bonded stake when it opened, counted at the close "
           "(`destra gov show`)")
    if refused:
        raise SystemExit(1)


def _tokens(micro: int) -> str:
    return f"{micro / 1e6:,.6g}"


def _line(p: dict[str, Any]) -> str:
    return (f"{p['proposal_id']}  {p['state']:<9}  {p['parameter']} = {p['value']}  "
            f"by {p['proposer']}  ({p['ballots_sent']} ballots)  {p['title']}")


def _detail(p: dict[str, Any]) -> str:
    lines = [_line(p), f"  deposit {_tokens(p['deposit_micro'])} tokens"]
    if p["description"]:
        lines.append(f"  {p['description']}")
    if "detail" in p:
        lines += [f"  yes {_tokens(p['yes_micro'])}, no {_tokens(p['no_micro'])}, abstain "
                  f"{_tokens(p['abstain_micro'])} of {_tokens(p['bonded_micro'])} bonded "
                  f"({p['ballots_counted']} ballots counted); deposit {p['deposit']}",
                  f"  {p['detail']}"]
    return "\n".join(lines)


def _read(account: str, flags: dict[str, Any], pick: Callable[[list[dict[str, Any]]], Any]
          ) -> Any:
    from destra.governance_client import proposals

    with _client(account, flags) as client:
        return pick(proposals(client))


@gov.command("list")
@settings_options
@_account
@_json
def gov_list(account: str, as_json: bool, **flags: Any) -> None:
    """Every proposal, its state and ballots."""
    found = _read(account, flags, lambda ps: ps)
    emit(found, as_json, lambda ps: "\n".join(_line(p) for p in ps) or "no proposals")


@gov.command("show")
@settings_options
@click.argument("proposal_id")
@_account
@_json
def gov_show(proposal_id: str, account: str, as_json: bool, **flags: Any) -> None:
    """One proposal, with its decrypted sums once closed."""
    found = _read(account, flags,
                  lambda ps: next((p for p in ps if p["proposal_id"] == proposal_id), None))
    if found is None:
        raise DestraError(f"no proposal {proposal_id}")
    emit(found, as_json, _detail)


@gov.command("params")
@settings_options
@_account
@_json
def gov_params(account: str, as_json: bool, **flags: Any) -> None:
    """The live parameters in force now, their ranges and who reads them."""
    from destra.governance_client import network_params
    from schemas.events import now_ms

    with _client(account, flags) as client:
        now = network_params(client).at(now_ms())
    rows = [{"parameter": name, "value": now[name], "default": p.default, "low": p.low,
             "high": p.high, "owner": p.owner, "doc": p.doc} for name, p in PARAMS.items()]
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['parameter']:<32} {r['value']:>16}  ({r['owner']}; default {r['default']}) "
        f"{r['doc']}" for r in rs))
