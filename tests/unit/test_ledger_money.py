"""Money moves: accounts' signed transfers, stakes, unstakes and withdrawals (nonces against
replay, unbonding slashable until released), proposal deposits (escrow, refund, burn), and
the live parameters the ledger follows (``ParameterChanged``); a rebuild from a checkpoint
and the entries after it comes back to the same state."""

from __future__ import annotations

import pickle

import pytest

from allocator.pricing import PriceBook, Tier
from destra.crypto import KeyPair, sign_event
from ledger.book import BURNED, TREASURY, deposit, stake, unbonding, user
from ledger.decider import MAX_FUTURE_MS, MAX_SUBMISSION_AGE_MS, LedgerDecider, node_wallet
from schemas import Event, new_event
from schemas.bindings import account_operation, sign_stake_consent
from schemas.samples import sample_event, with_fields
from streams.params import ParamSchedule
from streams.processing import Outcome
from tests.support import Record, account_keys, registration, signed_submission

T0 = 1_800_000_000_000
HOUR = 3_600_000
UNBONDING = 2 * HOUR


def _decider(**params: int) -> LedgerDecider:
    return LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 1)),
                         params=ParamSchedule({"unbonding_ms": UNBONDING,
                                               "gov_deposit_micro": 1_000, **params}))


def _mint(account: str, amount: int, at: int = T0) -> Event:
    return new_event("TokensMinted", "treasury", occurred_at=at, account=account,
                     amount_micro=amount, reason="test")


def _node(node: str, operator: str, stake_micro: int) -> Event:
    keys = account_keys(node)
    consent = sign_stake_consent(account_keys(operator), "", operator, node,
                                 keys.signing_public, stake_micro) if stake_micro else b""
    return sign_event(with_fields(sample_event("NodeRegistered"), node_id=node,
                                  operator_id=operator, stake_micro=stake_micro,
                                  signing_key=keys.signing_public, operator_consent=consent),
                      keys, node)


def _op(account: str, nonce: int, operation: str, target: str, amount: int = 0,
        keys: KeyPair | None = None, at: int = T0) -> Event:
    return account_operation(account, keys or account_keys(account), nonce, operation, target,
                             amount, "test", occurred_at=at)


def _penalty(node: str, amount: int, at: int) -> Event:
    return new_event("NodePenalized", "verifier", occurred_at=at, node_id=node, task_id="t",
                     reason="dissent", slash_micro=amount, reputation_permille=0)


def _proposal(pid: str, who: str, amount: int, at: int = T0) -> Event:
    e = with_fields(sample_event("ProposalSubmitted"), proposal_id=pid, proposer_id=who,
                    deposit_micro=amount).with_envelope(occurred_at=at)
    return sign_event(e, account_keys(who), who)


def _decided(pid: str, action: str, at: int = T0) -> Event:
    return with_fields(sample_event("ProposalDecided"), proposal_id=pid,
                       deposit=action).with_envelope(occurred_at=at)


def _changed(name: str, value: int, effective_at: int) -> Event:
    return with_fields(sample_event("ParameterChanged"), parameter=name, value=value,
                       effective_at=effective_at)


def _world() -> LedgerDecider:
    """alice (10,000), bob (1,000), op (10,000) with node n1 staked 4,000 by op."""
    d = _decider()
    for who, amount in (("alice", 10_000), ("bob", 1_000), ("op", 10_000)):
        d.judge(registration(who), T0)
        d.judge(_mint(who, amount), T0)
    assert d.judge(_node("n1", "op", 4_000), T0).emit
    return d


def _refusal(out: Outcome) -> str:
    assert out.emit == []
    [r] = out.rejected
    return r.reason.partition(":")[0]


def _legs(out: Outcome) -> list[tuple[str, str, int, str]]:
    return [(e.fields["transaction_id"], e.fields["account"], e.fields["amount_micro"],
             e.fields["kind"]) for e in out.emit]


# -- transfers and nonces ----------------------------------------------------------------------


def test_a_transfer_moves_tokens_between_registered_accounts() -> None:
    d = _world()
    out = d.judge(_op("alice", 1, "TRANSFER", "bob", 2_500), T0)
    assert _legs(out) == [("op/alice/1", user("alice"), -2_500, "transfer"),
                          ("op/alice/1", user("bob"), 2_500, "transfer")]
    assert d.book.balance(user("alice")) == 7_500 and d.book.balance(user("bob")) == 3_500
    assert d.book.total() == 0


@pytest.mark.parametrize(("op", "reason"), [
    (lambda: _op("alice", 1, "TRANSFER", "bob", 20_000), "insufficient-funds"),
    (lambda: _op("alice", 1, "TRANSFER", "nobody", 1), "unknown-account"),
    (lambda: _op("alice", 1, "TRANSFER", "bob", 0), "invalid-amount"),
    (lambda: _op("alice", 1, "TRANSFER", "bob", 1, keys=account_keys("mallory")),
     "bad-signature"),
    (lambda: _op("zed", 1, "TRANSFER", "bob", 1), "unregistered-account"),
    (lambda: _op("alice", 1, "STAKE", "n1", 1), "not-your-node"),
    (lambda: _op("op", 1, "STAKE", "n9", 1), "unknown-node"),
    (lambda: _op("op", 1, "STAKE", "n1", 10**9), "insufficient-funds"),
    (lambda: _op("op", 1, "UNSTAKE", "n1", 4_001), "insufficient-stake"),
    (lambda: _op("op", 1, "WITHDRAW", "n1", 5), "invalid-amount"),
    (lambda: _op("op", 1, "WITHDRAW", "n1"), "nothing-to-withdraw"),
])
def test_each_refusal_is_dead_lettered_with_its_reason_and_moves_nothing(op, reason) -> None:  # type: ignore[no-untyped-def]
    d = _world()
    before = d.book.snapshot()
    assert _refusal(d.judge(op(), T0)) == reason
    assert d.book.snapshot() == before


def test_a_nonce_is_taken_once_executed_or_refused() -> None:
    d = _world()
    assert d.judge(_op("alice", 5, "TRANSFER", "bob", 100), T0).emit
    # The same operation again, or one with a lower nonce: replay.
    assert _refusal(d.judge(_op("alice", 5, "TRANSFER", "bob", 100), T0)) == "replay"
    assert _refusal(d.judge(_op("alice", 4, "TRANSFER", "bob", 100), T0)) == "replay"
    # A refused transfer takes its nonce: replayed once the account is funded, not executed.
    poor = _op("bob", 1, "TRANSFER", "alice", 5_000)
    assert _refusal(d.judge(poor, T0)) == "insufficient-funds"
    d.judge(_op("alice", 6, "TRANSFER", "bob", 9_000), T0)
    assert _refusal(d.judge(poor, T0)) == "replay"
    assert d.book.balance(user("bob")) == 10_100
    # A badly signed operation takes no nonce: the account's own nonce 2 still works.
    assert _refusal(d.judge(_op("bob", 2, "TRANSFER", "alice", 1,
                                keys=account_keys("mallory")), T0)) == "bad-signature"
    assert d.nonces["bob"] == 1
    assert d.judge(_op("bob", 2, "TRANSFER", "alice", 1), T0).emit


# -- stake, unstake, withdraw ------------------------------------------------------------------


def test_stake_more_and_unstake_carry_the_operators_leg() -> None:
    d = _world()
    assert _legs(d.judge(_op("op", 1, "STAKE", "n1", 1_000), T0)) == [
        ("op/op/1", user("op"), -1_000, "stake"), ("op/op/1", stake("n1"), 1_000, "stake")]
    out = d.judge(_op("op", 2, "UNSTAKE", "n1", 3_000), T0 + 10)
    assert _legs(out) == [("op/op/2", stake("n1"), -3_000, "unstake"),
                          ("op/op/2", user("op"), 3_000, "unstake"),
                          ("op/op/2", user("op"), -3_000, "unbond"),
                          ("op/op/2", unbonding("n1"), 3_000, "unbond")]
    assert out.emit[0].fields["memo"] == f"unbonding until {T0 + 10 + UNBONDING}"
    assert d.book.balance(stake("n1")) == 2_000 and d.book.balance(unbonding("n1")) == 3_000
    assert d.book.balance(user("op")) == 5_000
    assert d.bonding == {"n1": {T0 + 10 + UNBONDING: 3_000}}


def test_a_withdrawal_waits_for_the_unbonding_and_takes_the_earnings_at_once() -> None:
    d = _world()
    d.book.balances[node_wallet("n1")] = 700  # earnings, as a settlement pays them
    d.book.balances["mint"] -= 700
    d.judge(_op("op", 1, "UNSTAKE", "n1", 1_000), T0)
    d.judge(_op("op", 2, "UNSTAKE", "n1", 500), T0 + HOUR)
    out = d.judge(_op("op", 3, "WITHDRAW", "n1"), T0 + 1)
    assert _legs(out) == [("op/op/3", node_wallet("n1"), -700, "withdraw"),
                          ("op/op/3", user("op"), 700, "withdraw")]
    # Only unmatured unbonding left: still bonding, with its release time.
    out = d.judge(_op("op", 4, "WITHDRAW", "n1"), T0 + UNBONDING - 1)
    assert _refusal(out) == "still-bonding"
    assert str(T0 + UNBONDING) in out.rejected[0].reason
    # The first tranche matured; the second not yet.
    out = d.judge(_op("op", 5, "WITHDRAW", "n1"), T0 + UNBONDING)
    assert _legs(out) == [("op/op/5", unbonding("n1"), -1_000, "withdraw"),
                          ("op/op/5", user("op"), 1_000, "withdraw")]
    assert d.bonding == {"n1": {T0 + HOUR + UNBONDING: 500}}
    assert d.judge(_op("op", 6, "WITHDRAW", "n1"), T0 + HOUR + UNBONDING).emit
    assert d.bonding == {} and d.book.balance(unbonding("n1")) == 0
    assert d.book.balance(user("op")) == 6_000 + 700 + 1_500
    assert d.book.total() == 0


def test_a_slash_takes_the_stake_first_then_the_unbonding_never_below_zero() -> None:
    d = _world()
    d.judge(_op("op", 1, "UNSTAKE", "n1", 3_000), T0)
    d.judge(_op("op", 2, "UNSTAKE", "n1", 500), T0 + 5)
    out = d.judge(_penalty("n1", 2_000, T0 + 10), T0 + 10)
    assert sorted(_legs(out)) == sorted([
        ("slash/" + out.emit[0].fields["transaction_id"].partition("/")[2], stake("n1"),
         -500, "slash"),
        (out.emit[0].fields["transaction_id"], unbonding("n1"), -1_500, "slash"),
        (out.emit[0].fields["transaction_id"], TREASURY, 2_000, "slash")])
    # From the tranches released last first.
    assert d.bonding == {"n1": {T0 + UNBONDING: 2_000}}
    out = d.judge(_penalty("n1", 10**9, T0 + 20), T0 + 20)
    assert d.book.balance(unbonding("n1")) == 0 and d.book.balance(stake("n1")) == 0
    assert d.bonding == {}
    assert _refusal(d.judge(_op("op", 3, "WITHDRAW", "n1"), T0 + UNBONDING)) == \
        "nothing-to-withdraw"
    assert d.book.total() == 0


def test_a_node_keeps_the_operator_its_first_registration_named() -> None:
    d = _world()
    # A forged registration (not signed by the node's key) binds nothing.
    forged = sign_event(with_fields(_node("n2", "bob", 0)), account_keys("mallory"), "n2")
    d.judge(forged, T0)
    assert "n2" not in d.operators
    # Registered unstaked by op, then again naming bob (who consents to a stake): no stake
    # is locked, op keeps the node.
    assert d.judge(_node("n2", "op", 0), T0).rejected == []
    out = d.judge(_node("n2", "bob", 500), T0)
    assert out.emit == [] and out.rejected[0].reason.startswith("operator-taken: ")
    assert d.operators == {"n1": "op", "n2": "op"}
    assert _refusal(d.judge(_op("bob", 1, "UNSTAKE", "n1", 1), T0)) == "not-your-node"
    assert _refusal(d.judge(_op("bob", 2, "STAKE", "n2", 1), T0)) == "not-your-node"


# -- governance deposits and parameters --------------------------------------------------------


def test_a_proposal_escrows_its_deposit_and_the_decision_refunds_or_burns_it() -> None:
    d = _world()
    out = d.judge(_proposal("p1", "alice", 2_000), T0)
    assert _legs(out) == [("deposit/p1", user("alice"), -2_000, "deposit"),
                          ("deposit/p1", deposit("p1"), 2_000, "deposit")]
    assert _refusal(d.judge(_proposal("p1", "alice", 2_000), T0)) == "duplicate-proposal"
    assert _legs(d.judge(_decided("p1", "REFUND"), T0)) == [
        ("deposit-refund/p1", deposit("p1"), -2_000, "refund"),
        ("deposit-refund/p1", user("alice"), 2_000, "refund")]
    assert d.judge(_decided("p1", "REFUND"), T0).emit == []  # once
    assert d.book.balance(user("alice")) == 10_000
    d.judge(_proposal("p2", "alice", 3_000), T0)
    assert d.judge(_decided("p2", "NONE"), T0).emit == []
    assert _legs(d.judge(_decided("p2", "BURN"), T0)) == [
        ("burn/p2", deposit("p2"), -3_000, "burn"), ("burn/p2", BURNED, 3_000, "burn")]
    assert d.book.balance(BURNED) == 3_000 and d.book.total() == 0
    assert d.judge(_decided("p2", "BURN"), T0).emit == []


@pytest.mark.parametrize(("proposal", "reason"), [
    (lambda: _proposal("p1", "alice", 999), "insufficient-deposit"),
    (lambda: _proposal("p1", "bob", 1_001), "insufficient-funds"),
    (lambda: sign_event(_proposal("p1", "alice", 2_000), account_keys("mallory"), "alice"),
     "bad-signature"),
    (lambda: _proposal("p1", "zed", 2_000), "unregistered-account"),
    # A copy appended more than 10 minutes after it was made: a replay (once the proposer
    # is funded, a proposal refused for want of funds would otherwise escrow after all).
    (lambda: _proposal("p1", "alice", 2_000, at=T0 - MAX_SUBMISSION_AGE_MS - 1),
     "stale-proposal"),
    (lambda: _proposal("p1", "alice", 2_000, at=T0 + MAX_FUTURE_MS + 1), "future-proposal"),
])
def test_a_proposal_without_its_deposit_is_dead_lettered(proposal, reason) -> None:  # type: ignore[no-untyped-def]
    d = _world()
    assert _refusal(d.judge(proposal(), T0)) == reason
    assert d.book.balance(user("alice")) == 10_000


def test_a_parameter_change_applies_to_the_next_settlement_and_deposit() -> None:
    d = _world()
    d.judge(_changed("fee_bps", 1_000, T0 + 1_000), T0)
    d.judge(_changed("gov_deposit_micro", 5_000, T0 + 1_000), T0)
    for i, at in enumerate((T0 + 500, T0 + 2_000)):
        sub = signed_submission(with_fields(
            sample_event("TaskSubmitted"), task_id=f"t{i}", submitter_id="alice",
            quoted_price_micro=300, max_price_micro=300, quote_expires_at=at + 60_000,
            compute_units=100, replicas=3, quorum=2).with_envelope(occurred_at=at))
        assert d.judge(sub, at).emit
    verified = [with_fields(sample_event("TaskVerified"), task_id=f"t{i}", contributions=[
        {"node_id": "n1", "digest": b"d" * 32, "compute_units": 300, "agreed": True}])
        for i in range(2)]
    fees = [sum(e.fields["amount_micro"] for e in d.judge(v, at).emit
                if e.fields["account"] == TREASURY)
            for v, at in zip(verified, (T0 + 900, T0 + 2_100), strict=True)]
    assert fees == [15, 30]  # 5 % before the change, 10 % from it
    assert _refusal(d.judge(_proposal("p1", "alice", 2_000), T0 + 2_000)) == \
        "insufficient-deposit"
    assert d.judge(_proposal("p1", "alice", 2_000), T0 + 999).emit
    assert _refusal(d.judge(_changed("fee_bps", 10**6, T0), T0)) == "invalid-parameter"


def test_unbonding_ms_is_the_one_in_force_at_the_requests_time() -> None:
    d = _world()
    d.judge(_changed("unbonding_ms", 1_000, T0 + 100), T0)
    d.judge(_op("op", 1, "UNSTAKE", "n1", 10), T0 + 99)
    d.judge(_op("op", 2, "UNSTAKE", "n1", 20), T0 + 100)
    assert d.bonding["n1"] == {T0 + 99 + UNBONDING: 10, T0 + 1_100: 20}


# -- rebuild -----------------------------------------------------------------------------------


def _state(d: LedgerDecider) -> dict:  # type: ignore[type-arg]
    """The checkpoint, less what a rebuild bounds rather than copies (``horizon``'s
    expiries, tested in test_ledger_freshness) and the batch bookkeeping (``recent``)."""
    state = d.checkpoint_state()
    return {k: v for k, v in state.items() if k not in ("recent", "horizon", "prices")}


def _rebuilt(state: dict, tail: list[Event], ops_read: list[tuple[Event, int]],  # type: ignore[type-arg]
             registrations: list[Event] = ()) -> LedgerDecider:  # type: ignore[assignment]
    """A decider rebuilt as ``ledger.processor.rebuild`` does: checkpoint, then its own
    entries after it (per account in order), then the node registrations and the
    operations it decided after it."""
    again = _decider()
    again.restore_state(pickle.loads(pickle.dumps(state)))
    before = set(again.recent)
    again.checkpoint_taken()
    by_account: dict[str, list[Event]] = {}
    for e in tail:
        if e.name == "LedgerEntryPosted":
            by_account.setdefault(e.fields["account"], []).append(e)
    for entries in reversed(list(by_account.values())):  # partitions in any order
        for e in entries:
            if e.fields["transaction_id"] not in before:
                again.restore(e)
    for r in registrations:
        again.bind_operator(r)
    for op, at in ops_read:
        again.recall_op(op, at)
    return again


def test_a_rebuild_from_checkpoint_and_entries_gives_the_same_state() -> None:
    live = _world()
    live.judge(_op("op", 1, "UNSTAKE", "n1", 1_000), T0)
    live.judge(_proposal("p0", "alice", 1_000), T0)
    state = live.checkpoint_state()
    live.checkpoint_taken()
    tail: list[Event] = []
    ops: list[tuple[Event, int]] = []
    inputs: list[tuple[Event, int]] = [
        (_op("op", 2, "UNSTAKE", "n1", 2_000), T0 + 10),
        (_op("alice", 3, "TRANSFER", "bob", 100), T0 + 20),
        (_penalty("n1", 1_500, T0 + 30), T0 + 30),
        (_op("op", 4, "WITHDRAW", "n1"), T0 + UNBONDING + 5),
        (_op("bob", 9, "TRANSFER", "alice", 10**6), T0 + 40),  # refused: takes nonce 9
        (_proposal("p1", "alice", 2_000), T0 + 50),
        (_decided("p0", "BURN"), T0 + 60),
        (_changed("fee_bps", 42, T0 + 70), T0 + 70),
    ]
    for event, at in inputs:
        tail += live.judge(event, at).emit
        if event.name == "AccountOperation":
            ops.append((event, at))
    again = _rebuilt(state, tail, ops)
    again.judge(_changed("fee_bps", 42, T0 + 70), T0 + 70)  # the rebuild re-reads changes
    assert _state(again) == _state(live)
    assert again.nonces == {"op": 4, "alice": 3, "bob": 9}
    assert again.bonding == live.bonding == {"n1": {T0 + 10 + UNBONDING: 1_500}}
    # The refused operation replayed is refused by both; the next ones agree.
    for event, at in [(_op("bob", 9, "TRANSFER", "alice", 10), T0 + 80),
                      (_op("op", 5, "WITHDRAW", "n1"), T0 + 10 + UNBONDING),
                      (_decided("p1", "REFUND"), T0 + 90)]:
        a, b = live.judge(event, at), again.judge(event, at)
        assert _legs(a) == _legs(b)
        assert [r.reason for r in a.rejected] == [r.reason for r in b.rejected]
    assert again.book.snapshot() == live.book.snapshot()


def test_a_crash_between_a_refused_operation_and_the_next_checkpoint_keeps_its_nonce() -> None:
    # The refused transfer leaves no entry: the rebuild recalls its nonce from the ops
    # topic (read below the last committed positions), so its copy is still a replay.
    live = _world()
    state = live.checkpoint_state()
    live.checkpoint_taken()
    poor = _op("bob", 7, "TRANSFER", "alice", 5_000)
    forged = _op("bob", 8, "TRANSFER", "alice", 1, keys=account_keys("mallory"))
    assert _refusal(live.judge(poor, T0 + 1)) == "insufficient-funds"
    assert _refusal(live.judge(forged, T0 + 2)) == "bad-signature"
    again = _rebuilt(state, [], [(poor, T0 + 1), (forged, T0 + 2)])
    assert again.nonces == live.nonces == {"bob": 7}
    for d in (live, again):
        d.judge(_mint("bob", 10_000, T0 + 3), T0 + 3)
        assert _refusal(d.judge(poor, T0 + 4)) == "replay"
        assert d.judge(_op("bob", 8, "TRANSFER", "alice", 1), T0 + 5).emit
    assert again.book.snapshot() == live.book.snapshot()


def test_the_node_operators_come_back_from_the_registrations_and_the_stakes() -> None:
    live = _world()
    state = live.checkpoint_state()
    live.checkpoint_taken()
    reg = _node("n2", "alice", 0)
    live.judge(reg, T0)
    again = _rebuilt(state, [], [], [reg])
    assert again.operators == live.operators == {"n1": "op", "n2": "alice"}
    # Without a checkpoint, the stake's own entries name its operator.
    fresh = _decider()
    for e in _world().judge(_node("n3", "op", 100), T0).emit:
        fresh.restore(e)
    assert fresh.operators == {"n3": "op"}


def test_the_audit_rederives_the_money_moves_without_discrepancy() -> None:
    from ledger.audit import AuditConfig, Record, audit

    live = _decider()
    config = AuditConfig(params={"unbonding_ms": UNBONDING, "gov_deposit_micro": 1_000})
    inputs: list[tuple[Event, int]] = [
        *((registration(who), T0) for who in ("alice", "bob", "op")),
        *((_mint(who, 10_000), T0 + 1) for who in ("alice", "bob", "op")),
        (_node("n1", "op", 4_000), T0 + 2),
        (_op("alice", 1, "TRANSFER", "bob", 2_500), T0 + 3),
        (_op("op", 1, "UNSTAKE", "n1", 1_000), T0 + 4),
        (_op("op", 2, "WITHDRAW", "n1"), T0 + 5),
        (_penalty("n1", 3_500, T0 + 6), T0 + 6),
        (_changed("fee_bps", 100, T0 + 7), T0 + 7),
        (_proposal("p1", "alice", 2_000), T0 + 8),
        (_decided("p1", "BURN", T0 + 9), T0 + 9),
        (_op("op", 3, "WITHDRAW", "n1"), T0 + UNBONDING + 4),
    ]
    records: list[Record] = []
    for offset, (event, at) in enumerate(inputs):
        records.append(Record(event, "in", 0, offset, at))
        for out_offset, emitted in enumerate(live.judge(event, at, 0).emit):
            records.append(Record(emitted, "out", 0, offset * 10 + out_offset, at))
    assert live.book.balance(BURNED) == 2_000 and live.book.balance(unbonding("n1")) == 0
    report = audit(records, None, config)
    assert [d for d in report.discrepancies if d.check == "ledger"] == []
    assert report.checked["ledger_entries"] == report.checked["ledger_entries_rederived"] > 20


def test_the_rebuild_recalls_the_nonces_of_the_operations_decided_and_only_those(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ledger.processor as processor
    from destra.settings import Settings
    from schemas import encode
    from streams.topics import topic_for

    def _rec(event: Event, offset: int, at: int) -> Record:
        return Record(encode(event), offset, topic_for(event.name).name("t."), at,
                      timestamp_type=2)  # LogAppendTime

    class _Genesis:
        @staticmethod
        def check(event: Event) -> str | None:
            return None

    refused = _op("bob", 7, "TRANSFER", "alice", 10**9)  # decided: refused, took nonce 7
    forged = _op("bob", 9, "TRANSFER", "alice", 1, keys=account_keys("mallory"))
    early = _op("carol", 3, "TRANSFER", "bob", 1)  # decided before carol was bound: no nonce
    unread = _op("bob", 8, "TRANSFER", "alice", 1)  # past the last committed batch
    records = [_rec(registration("bob"), 0, T0), _rec(registration("carol"), 1, T0),
               _rec(refused, 0, T0 + 1), _rec(forged, 1, T0 + 2), _rec(early, 2, T0 + 3),
               _rec(unread, 3, T0 + 4)]
    monkeypatch.setattr(processor, "read_all", lambda bootstrap, t, start=None: [
        r for r in records if r.topic() == t and r.offset() >= (start or {}).get((t, 0), 0)])
    registry = topic_for("AccountRegistered").name("t.")
    ops = topic_for("AccountOperation").name("t.")
    d = _decider()
    processor.rebuild(Settings(topic_prefix="t."), "127.0.0.1:1", d,
                      genesis=_Genesis(),  # type: ignore[arg-type]
                      checkpoint=None, decided={(registry, 0): 1, (ops, 0): 3})
    assert d.nonces == {"bob": 7}
    assert set(d.account_keys) == {"bob", "carol"}
