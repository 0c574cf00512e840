"""Double-entry ledger arithmetic: the money rules, pure and in integers.

Every movement is a ``Transaction`` whose postings sum to zero, so the
ledger as a whole always sums to zero. Tokens enter only by a mint, which
debits the ``mint`` account (its negative balance is the supply in
circulation). Amounts are ``int`` micro-tokens; a float anywhere is an error.

Accounts: ``user:<id>`` (submitters, operators), ``escrow:<task>``,
``stake:<node>``, ``treasury`` and ``mint``. Only ``mint`` may go negative.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from destra.errors import DestraError

MINT = "mint"
TREASURY = "treasury"
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


@dataclass(frozen=True)
class Posting:
    """One side of a movement: ``amount_micro`` added to ``account`` (negative: taken)."""

    account: str
    amount_micro: int
    kind: str
    """escrow, payout, fee, refund, slash, mint, stake."""


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
             stake_micro: int) -> Transaction:
    """Take a penalty from a node's stake to the treasury, never more than it holds."""
    taken = max(0, min(amount_micro, stake_micro))
    return _tx(transaction_id, task_id, "slash", [Posting(stake(node_id), -taken, "slash"),
                                                  Posting(TREASURY, taken, "slash")])


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
