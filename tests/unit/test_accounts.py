"""Accounts exist before anything is credited to them: a signed registration binds an
account id to its key (proof of possession), once; the ledger refuses mints to, and
submissions from, an account that is not registered or not signed by its key."""

from __future__ import annotations

import pickle

from allocator.pricing import PriceBook, Tier
from destra.crypto import KeyPair, sign_event
from ledger.book import stake, user
from ledger.decider import LedgerDecider
from schemas import Event, new_event
from schemas.bindings import sign_stake_consent
from schemas.samples import sample_event, with_fields
from tests.support import account_keys, registration, signed_submission

T0 = 1_800_000_000_000


def _decider() -> LedgerDecider:
    return LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)))


def _mint(account: str, amount: int) -> Event:
    return new_event("TokensMinted", "treasury", occurred_at=T0, account=account,
                     amount_micro=amount, reason="test")


def _submit(task_id: str, who: str, keys: KeyPair | None = None) -> Event:
    e = with_fields(sample_event("TaskSubmitted"), task_id=task_id, submitter_id=who,
                    quoted_price_micro=300, max_price_micro=300, quote_expires_at=T0 + 60_000,
                    compute_units=100, replicas=3, quorum=2).with_envelope(occurred_at=T0)
    if keys is None:
        return signed_submission(e)
    return sign_event(e.replace(signing_key=keys.signing_public), keys, who)


def _reason(d: LedgerDecider, e: Event) -> str:
    [out] = d.judge(e, T0).emit
    assert out.name == "TaskFailed"
    return str(out.fields["reason"])


def test_a_mint_to_an_unregistered_account_is_refused_and_moves_no_money() -> None:
    d = _decider()
    mint = _mint("alice", 1_000)
    out = d.judge(mint, T0)
    assert out.emit == []
    assert out.rejected[0].reason.startswith("unregistered-account: ")
    assert d.book.balance(user("alice")) == 0 and d.book.total() == 0
    # Its id is taken: once the account exists, the same mint replayed is not credited;
    # the treasury mints again with a new event.
    assert d.judge(registration("alice"), T0).rejected == []
    assert d.judge(mint, T0).emit == []
    assert d.book.balance(user("alice")) == 0
    assert d.judge(_mint("alice", 1_000), T0).emit
    assert d.book.balance(user("alice")) == 1_000


def test_a_submission_from_an_unregistered_account_fails_with_the_reason() -> None:
    d = _decider()
    assert _reason(d, _submit("t1", "alice")) == "unregistered-account"
    # Its task id is not taken by the refusal: registered and funded, it is escrowed.
    d.judge(registration("alice"), T0)
    d.judge(_mint("alice", 1_000), T0)
    assert [e.name for e in d.judge(_submit("t1", "alice"), T0).emit] == [
        "LedgerEntryPosted", "LedgerEntryPosted"]


def test_a_stranger_cannot_spend_tokens_minted_to_an_account_by_submitting_first() -> None:
    # Before registration, an account belonged to the first key that submitted for it:
    # tokens minted to it were spent by a stranger's first signed submission.
    d = _decider()
    d.judge(registration("alice"), T0)
    d.judge(_mint("alice", 1_000), T0)
    mallory = account_keys("mallory")
    assert _reason(d, _submit("t1", "alice", mallory)) == "wrong-key"
    assert d.book.balance(user("alice")) == 1_000
    assert "t1" not in d.tasks


def test_an_account_id_is_bound_once_the_same_key_again_is_idempotent() -> None:
    d = _decider()
    first = registration("alice")
    assert d.judge(first, T0).rejected == []
    again = registration("alice")  # a new event, the same key
    assert d.judge(again, T0).rejected == [] and d.judge(first, T0).rejected == []
    taken = registration("alice", account_keys("mallory"))
    out = d.judge(taken, T0)
    assert out.emit == [] and out.rejected[0].reason.startswith("account-taken: ")
    assert d.account_keys["alice"] == account_keys("alice").signing_public


def test_a_registration_not_signed_by_the_key_it_registers_binds_nothing() -> None:
    d = _decider()
    alice, mallory = account_keys("alice"), account_keys("mallory")
    forged = sign_event(new_event("AccountRegistered", "alice", account_id="alice",
                                  signing_key=alice.signing_public,
                                  encryption_key=alice.encryption_public), mallory, "alice")
    assert d.judge(forged, T0).rejected[0].reason.startswith("bad-signature: ")
    unsigned = forged.with_envelope(signature=None)
    assert d.judge(unsigned, T0).rejected[0].reason.startswith("bad-signature: ")
    other = sign_event(with_fields(registration("alice"), account_id="bob"), alice, "alice")
    assert d.judge(other, T0).rejected[0].reason.startswith("bad-signature: ")  # signer != id
    assert d.account_keys == {}


def test_the_bindings_survive_a_checkpoint_and_a_rebuild_by_replay() -> None:
    live = _decider()
    live.judge(registration("alice"), T0)
    state = pickle.loads(pickle.dumps(live.checkpoint_state()))
    assert state["account_keys"] == {"alice": account_keys("alice").signing_public}
    again = _decider()
    again.restore_state(state)
    # Registrations after the checkpoint come back by replay (``register``), in log order:
    # a later binding of a taken id is still refused.
    again.register(registration("bob"))
    again.register(registration("alice", account_keys("mallory")))
    assert again.account_keys == {"alice": account_keys("alice").signing_public,
                                  "bob": account_keys("bob").signing_public}
    assert _reason(again, _submit("t1", "alice", account_keys("mallory"))) == "wrong-key"


# ---------------------------------------------------------------- stake consent


def _node(node: str, operator: str, stake: int, consent: bytes = b"",
          node_keys: KeyPair | None = None) -> Event:
    keys = node_keys or account_keys(node)
    return sign_event(with_fields(sample_event("NodeRegistered"), node_id=node,
                                  operator_id=operator, stake_micro=stake,
                                  signing_key=keys.signing_public, operator_consent=consent),
                      keys, node)


def _consent(operator: str, node: str, stake: int, network: str = "",
             by: KeyPair | None = None) -> bytes:
    return sign_stake_consent(by or account_keys(operator), network, operator, node,
                              account_keys(node).signing_public, stake)


def _funded(*accounts: str) -> LedgerDecider:
    d = _decider()
    for a in accounts:
        d.judge(registration(a), T0)
        d.judge(_mint(a, 10_000), T0)
    return d


def test_a_stranger_naming_someone_elses_operator_locks_none_of_its_tokens() -> None:
    # Before consents, a node's stake came from whatever operator_id its registration
    # named: a stranger's node locked (and could then lose) alice's tokens.
    d = _funded("alice")
    out = d.judge(_node("mallory-node", "alice", 4_000), T0)
    assert out.emit == []
    assert out.rejected[0].reason.startswith("no-stake-consent: ")
    assert d.book.balance(user("alice")) == 10_000
    assert d.book.balance(stake("mallory-node")) == 0


def test_a_consent_signed_by_the_operators_registered_key_locks_the_stake_once() -> None:
    d = _funded("op")
    reg = _node("n1", "op", 4_000, _consent("op", "n1", 4_000))
    assert [e.fields["account"] for e in d.judge(reg, T0).emit] == [user("op"), stake("n1")]
    assert d.judge(reg, T0).emit == []  # once per node
    assert d.book.balance(user("op")) == 6_000 and d.book.balance(stake("n1")) == 4_000


def test_a_consent_for_another_amount_node_network_or_key_is_refused() -> None:
    d = _funded("op")
    bad = {
        "amount": _node("n1", "op", 4_000, _consent("op", "n1", 3_000)),
        "node": _node("n2", "op", 4_000, _consent("op", "n1", 4_000)),
        "network": _node("n1", "op", 4_000, _consent("op", "n1", 4_000, network="other.")),
        "key": _node("n1", "op", 4_000, _consent("op", "n1", 4_000,
                                                 by=account_keys("mallory"))),
        "node key": _node("n1", "op", 4_000, _consent("op", "n1", 4_000),
                          node_keys=account_keys("n1-other")),
    }
    for what, reg in bad.items():
        out = d.judge(reg, T0)
        assert out.emit == [], what
        assert out.rejected[0].reason.startswith("no-stake-consent: "), what
    assert d.book.balance(user("op")) == 10_000


def test_an_unregistered_operator_stakes_nothing() -> None:
    d = _decider()
    out = d.judge(_node("n1", "op", 4_000, _consent("op", "n1", 4_000)), T0)
    assert out.emit == [] and "not a registered account" in out.rejected[0].reason
