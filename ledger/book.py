"""Double-entry ledger arithmetic: the money rules, pure and in integers.

Every movement is a ``Transaction`` whose postings sum to zero, so the
ledger as a whole always sums to zero. Tokens enter only by a mint, which
debits the ``mint`` account (its negative balance is the supply in
circulation). Amounts are ``int`` micro-tokens; a float anywhere is an error.

Accounts: ``user:<id>`` (submitters, operators), ``escrow:<task>``,
``stake:<node>``, ``unbonding:<node>`` (unstaked, still slashable until released),
``node:<id>`` (a node's earnings), ``deposit:<proposal>`` (a governance proposal's
deposit), ``treasury``, ``burned`` (tokens taken out of circulation: a burned
deposit) and ``mint``. Only ``mint`` may go negative; the supply in circulation is
``-mint - burned``.

Every transaction that moves an operator's tokens into or out of ``stake:<node>`` or
``unbonding:<node>`` carries the operator's ``user:<op>`` leg, so a reader of the
entries alone can tell whose stake it is (governance's voting power).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from destra.errors import DestraError

MINT = "mint"
TREASURY = "treasury"
BURNED = "burned"
"""Where burned tokens go (entry kind ``burn``): out of circulation, never out again."""
BPS = 10_000
"""Basis points in one whole: fees are given in basis points."""


class LedgerError(DestraError):
    """A transaction breaks a ledger rule (unbalanced, float amount, overdraft)."""


class InsufficientFunds(LedgerError):
    """The paying account's balance does not cover the amount."""


def user(account_id: str) -> str:
    """The account of a submitter or operator."""
    return f"user:{account_id}"


def escrow(task_id: str) -> str:
    """The account holding a task's escrowed price until its verdict."""
    return f"escrow:{task_id}"


def stake(node_id: str) -> str:
    """The account holding a node's stake, which penalties slash."""
    return f"stake:{node_id}"


def unbonding(node_id: str) -> str:
    """The account holding a node's unstaked tokens until they are released: still
    slashable, withdrawable to its operator once matured."""
    return f"unbonding:{node_id}"


def deposit(proposal_id: str) -> str:
    """The account holding a governance proposal's deposit until it is decided."""
    return f"deposit:{proposal_id}"


@dataclass(frozen=True)
class Posting:
    """One side of a movement: ``amount_micro`` added to ``account`` (negative: taken)."""

    account: str
    amount_micro: int
    kind: str
    """escrow, payout, fee, refund, slash, mint, stake, transfer, unstake, unbond,
    withdraw, deposit, burn."""


@dataclass(frozen=True)
class Transaction:
    """Postings applied together or not at all; they always sum to zero."""

    transaction_id: str
    postings: tuple[Posting, ...]
    task_id: str | None = None
    memo: str = ""

    def __post_init__(self) -> None:
        for p in self.postings:
            if type(p.amount_micro) is not int:  # bool is an int subclass: refuse it too
                raise LedgerError(f"{self.transaction_id}: amount {p.amount_micro!r} is not int")
        total = sum(p.amount_micro for p in self.postings)
        if total != 0:
            raise LedgerError(f"{self.transaction_id}: postings sum to {total}, not 0")


def _tx(transaction_id: str, task_id: str | None, memo: str,
        postings: Iterable[Posting]) -> Transaction:
    kept = tuple(p for p in postings if p.amount_micro != 0)
    return Transaction(transaction_id, kept, task_id, memo)


def mint_tx(transaction_id: str, account: str, amount_micro: int) -> Transaction:
    """New tokens from the faucet (local networks) or governance."""
    if amount_micro <= 0:
        raise LedgerError(f"mint of {amount_micro}: must be positive")
    return _tx(transaction_id, None, "mint", [Posting(MINT, -amount_micro, "mint"),
                                               Posting(account, amount_micro, "mint")])


def escrow_tx(transaction_id: str, task_id: str, payer: str, price_micro: int,
              balance_micro: int) -> Transaction:
    """Move a task's quoted price from the submitter into its escrow account."""
    if price_micro <= 0:
        raise LedgerError(f"task {task_id}: price {price_micro} must be positive")
    if balance_micro < price_micro:
        raise InsufficientFunds(
            f"task {task_id}: {payer} has {balance_micro} micro-tokens, price is {price_micro}")
    return _tx(transaction_id, task_id, "escrow", [Posting(payer, -price_micro, "escrow"),
                                                   Posting(escrow(task_id), price_micro, "escrow")])


@dataclass(frozen=True)
class Share:
    """An agreeing replica's claim on the escrow: who is paid, for how much compute."""

    account: str
    compute_units: int


def settle_tx(transaction_id: str, task_id: str, payer: str, escrowed_micro: int,
              budget_units: int, shares: Sequence[Share], fee_bps: int, *,
              pro_rata: bool = False) -> Transaction:
    """Pay agreeing replicas from escrow by the compute they gave; fee; refund the rest.

    The escrow bought ``budget_units`` of compute (units x replicas quoted). A
    share of ``u`` units earns ``floor(escrowed * u / budget_units)`` gross, of
    which ``floor(gross * fee_bps / 10000)`` goes to the treasury. What no share
    earned (absent replicas, rounding) is refunded, so escrow ends at zero.
    With ``pro_rata`` (adaptive trust: spot checks and escalations may bring more
    agreeing replicas than were bought), shares beyond the budget divide it instead:
    ``floor(escrowed * u / max(budget_units, total units))``.
    """
    if not 0 <= fee_bps <= BPS:
        raise LedgerError(f"fee {fee_bps} bps out of range 0..{BPS}")
    total = sum(s.compute_units for s in shares)
    if budget_units <= 0 or (total > budget_units and not pro_rata):
        raise LedgerError(f"task {task_id}: shares exceed the {budget_units} units paid for")
    budget_units = max(budget_units, total)
    postings = [Posting(escrow(task_id), -escrowed_micro, "payout")]
    paid = 0
    for s in sorted(shares, key=lambda s: s.account):  # order-independent result
        gross = escrowed_micro * s.compute_units // budget_units
        fee = gross * fee_bps // BPS
        postings += [Posting(s.account, gross - fee, "payout"), Posting(TREASURY, fee, "fee")]
        paid += gross
    postings.append(Posting(payer, escrowed_micro - paid, "refund"))
    return _tx(transaction_id, task_id, "settle", _merge(postings))


def refund_tx(transaction_id: str, task_id: str, payer: str, escrowed_micro: int) -> Transaction:
    """A failed task: the whole escrow goes back to the submitter."""
    return _tx(transaction_id, task_id, "refund",
               [Posting(escrow(task_id), -escrowed_micro, "refund"),
                Posting(payer, escrowed_micro, "refund")])


def stake_tx(transaction_id: str, node_id: str, operator: str, amount_micro: int,
             balance_micro: int) -> Transaction:
    """Lock an operator's tokens as a node's stake."""
    if balance_micro < amount_micro:
        raise InsufficientFunds(
            f"node {node_id}: {operator} has {balance_micro} micro-tokens, stake is {amount_micro}")
    return _tx(transaction_id, None, "stake", [Posting(operator, -amount_micro, "stake"),
                                               Posting(stake(node_id), amount_micro, "stake")])


def slash_tx(transaction_id: str, node_id: str, task_id: str | None, amount_micro: int,
             stake_micro: int, unbonding_micro: int = 0) -> Transaction:
    """Take a penalty from a node's stake, then from its unbonding, to the treasury, never
    more than they hold."""
    from_stake = max(0, min(amount_micro, stake_micro))
    from_unbonding = max(0, min(amount_micro - from_stake, unbonding_micro))
    return _tx(transaction_id, task_id, "slash",
               [Posting(stake(node_id), -from_stake, "slash"),
                Posting(unbonding(node_id), -from_unbonding, "slash"),
                Posting(TREASURY, from_stake + from_unbonding, "slash")])


def _positive(transaction_id: str, amount_micro: int) -> None:
    if type(amount_micro) is not int or amount_micro <= 0:
        raise LedgerError(f"{transaction_id}: amount {amount_micro!r} must be a positive int")


def _covers(transaction_id: str, account: str, balance_micro: int, amount_micro: int) -> None:
    if balance_micro < amount_micro:
        raise InsufficientFunds(f"{transaction_id}: {account} has {balance_micro} "
                                f"micro-tokens, {amount_micro} needed")


def transfer_tx(transaction_id: str, payer: str, payee: str, amount_micro: int,
                balance_micro: int, memo: str = "") -> Transaction:
    """Move tokens from one account to another."""
    _positive(transaction_id, amount_micro)
    _covers(transaction_id, payer, balance_micro, amount_micro)
    return _tx(transaction_id, None, memo, [Posting(payer, -amount_micro, "transfer"),
                                            Posting(payee, amount_micro, "transfer")])


def unstake_tx(transaction_id: str, node_id: str, operator: str, amount_micro: int,
               stake_micro: int, release_at: int) -> Transaction:
    """Move part of a node's stake into its unbonding, by way of its operator's account
    (both legs there: the operator is named, its balance unchanged). The memo carries the
    release time (``release_of``)."""
    _positive(transaction_id, amount_micro)
    _covers(transaction_id, stake(node_id), stake_micro, amount_micro)
    return _tx(transaction_id, None, f"{UNBONDING_MEMO}{release_at}",
               [Posting(stake(node_id), -amount_micro, "unstake"),
                Posting(operator, amount_micro, "unstake"),
                Posting(operator, -amount_micro, "unbond"),
                Posting(unbonding(node_id), amount_micro, "unbond")])


UNBONDING_MEMO = "unbonding until "
"""An unstake's memo: this, then the release time (ms), which a rebuild reads back."""


def release_of(memo: str) -> int | None:
    """The release time an unstake's memo carries (``unstake_tx``), or None."""
    if not memo.startswith(UNBONDING_MEMO):
        return None
    tail = memo[len(UNBONDING_MEMO):]
    return int(tail) if tail.isdigit() else None


def withdraw_tx(transaction_id: str, node_id: str, operator: str, earnings_micro: int,
                matured_micro: int, memo: str = "") -> Transaction:
    """A node's earnings and its matured unbonding to its operator's account."""
    if earnings_micro < 0 or matured_micro < 0 or earnings_micro + matured_micro <= 0:
        raise LedgerError(f"{transaction_id}: nothing to withdraw")
    return _tx(transaction_id, None, memo,
               [Posting(f"node:{node_id}", -earnings_micro, "withdraw"),
                Posting(unbonding(node_id), -matured_micro, "withdraw"),
                Posting(operator, earnings_micro + matured_micro, "withdraw")])


def deposit_tx(transaction_id: str, proposal_id: str, proposer: str, amount_micro: int,
               balance_micro: int) -> Transaction:
    """Escrow a proposal's deposit from its proposer."""
    _positive(transaction_id, amount_micro)
    _covers(transaction_id, proposer, balance_micro, amount_micro)
    return _tx(transaction_id, None, f"deposit of proposal {proposal_id}",
               [Posting(proposer, -amount_micro, "deposit"),
                Posting(deposit(proposal_id), amount_micro, "deposit")])


def deposit_release_tx(transaction_id: str, proposal_id: str, to: str,
                       held_micro: int) -> Transaction:
    """A decided proposal's deposit: back to its proposer (kind ``refund``) or to
    ``BURNED`` (kind ``burn``)."""
    kind = "burn" if to == BURNED else "refund"
    return _tx(transaction_id, None, f"{kind} of proposal {proposal_id}'s deposit",
               [Posting(deposit(proposal_id), -held_micro, kind), Posting(to, held_micro, kind)])


def _merge(postings: Iterable[Posting]) -> list[Posting]:
    """One posting per (account, kind): a fee of several shares is one treasury line."""
    merged: dict[tuple[str, str], int] = {}
    for p in postings:
        merged[(p.account, p.kind)] = merged.get((p.account, p.kind), 0) + p.amount_micro
    return [Posting(a, amount, k) for (a, k), amount in merged.items()]


@dataclass
class Book:
    """Balances folded from transactions; a transaction id remembered is applied once."""

    balances: dict[str, int] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)
    """The ids this book refuses to apply again. Its owner keeps only those that can recur
    (the ledger decider remembers ids that expire in ``ledger.horizon``, not here)."""

    def balance(self, account: str) -> int:
        """The account's balance in micro-tokens (0 if it never moved)."""
        return self.balances.get(account, 0)

    def apply(self, tx: Transaction, *, remember: bool = True) -> bool:
        """Apply a transaction; False (and no change) if its id is in ``applied``.
        ``remember=False`` applies it without adding its id (its caller keeps it from
        recurring another way)."""
        if tx.transaction_id in self.applied:
            return False
        after = {p.account: self.balance(p.account) for p in tx.postings}
        for p in tx.postings:
            after[p.account] += p.amount_micro
        overdrawn = [a for a, b in after.items() if b < 0 and a != MINT]
        if overdrawn:
            raise InsufficientFunds(f"{tx.transaction_id} would overdraw {', '.join(overdrawn)}")
        self.balances.update(after)
        if remember:
            self.applied.add(tx.transaction_id)
        return True

    def total(self) -> int:
        """The sum of every balance: zero, always."""
        return sum(self.balances.values())

    def snapshot(self) -> Mapping[str, int]:
        """Non-zero balances, for comparisons (replay against live)."""
        return {a: b for a, b in sorted(self.balances.items()) if b != 0}
