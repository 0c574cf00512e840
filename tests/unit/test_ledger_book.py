"""The money rules: integers only, every transaction balanced, nobody paid twice."""

from __future__ import annotations

import random

import pytest

from ledger.book import (
    MINT,
    TREASURY,
    Book,
    InsufficientFunds,
    LedgerError,
    Posting,
    Share,
    Transaction,
    escrow,
    escrow_tx,
    mint_tx,
    refund_tx,
    settle_tx,
    slash_tx,
    stake,
    stake_tx,
    user,
)


def test_an_unbalanced_or_float_transaction_cannot_be_built() -> None:
    with pytest.raises(LedgerError, match="sum to 1"):
        Transaction("t", (Posting("a", 1, "x"),))
    with pytest.raises(LedgerError, match="not int"):
        Transaction("t", (Posting("a", 1.0, "x"), Posting("b", -1, "x")))  # type: ignore[arg-type]


def test_escrow_needs_the_funds_and_says_how_much_is_missing() -> None:
    with pytest.raises(InsufficientFunds, match="has 99 micro-tokens, price is 100"):
        escrow_tx("e1", "task-1", user("alice"), 100, balance_micro=99)


def test_verified_task_pays_agreeing_nodes_by_compute_takes_fee_and_refunds_the_rest() -> None:
    book = Book()
    book.apply(mint_tx("m1", user("alice"), 1_000_000))
    book.apply(escrow_tx("e1", "t1", user("alice"), 300_000, book.balance(user("alice"))))
    # Three replicas of 100 units were paid for; two agreed.
    shares = [Share(user("op-a"), 100), Share(user("op-b"), 100)]
    book.apply(settle_tx("s1", "t1", user("alice"), 300_000, 300, shares, fee_bps=500))
    assert book.balance(user("op-a")) == book.balance(user("op-b")) == 95_000
    assert book.balance(TREASURY) == 10_000
    assert book.balance(user("alice")) == 1_000_000 - 200_000
    assert book.balance(escrow("t1")) == 0
    assert book.total() == 0


def test_rounding_never_creates_or_loses_a_micro_token() -> None:
    rng = random.Random(7)
    for i in range(500):
        escrowed = rng.randint(1, 10**9)
        units = rng.randint(1, 10**6)
        replicas = rng.randint(1, 7)
        shares = [Share(user(f"n{j}"), units) for j in range(rng.randint(0, replicas))]
        tx = settle_tx(f"s{i}", "t", user("p"), escrowed, units * replicas, shares,
                       fee_bps=rng.randint(0, 10_000))
        assert sum(p.amount_micro for p in tx.postings) == 0
        assert all(p.amount_micro >= 0 for p in tx.postings if p.account != escrow("t"))


def test_settling_the_same_transaction_twice_pays_once() -> None:
    book = Book()
    book.apply(mint_tx("m1", user("alice"), 500))
    book.apply(escrow_tx("e1", "t1", user("alice"), 300, 500))
    settle = settle_tx("s1", "t1", user("alice"), 300, 3, [Share(user("n"), 1)], fee_bps=0)
    assert book.apply(settle) is True
    assert book.apply(settle) is False
    assert book.balance(user("n")) == 100 and book.total() == 0


def test_a_failed_task_is_refunded_in_full() -> None:
    book = Book()
    book.apply(mint_tx("m1", user("bob"), 700))
    book.apply(escrow_tx("e1", "t9", user("bob"), 700, 700))
    book.apply(refund_tx("r1", "t9", user("bob"), 700))
    assert book.balance(user("bob")) == 700 and book.balance(escrow("t9")) == 0


def test_slashing_takes_from_stake_to_treasury_but_never_more_than_the_stake() -> None:
    book = Book()
    book.apply(mint_tx("m1", user("op"), 1_000))
    book.apply(stake_tx("k1", "node-1", user("op"), 600, 1_000))
    book.apply(slash_tx("x1", "node-1", "t1", 250, book.balance(stake("node-1"))))
    book.apply(slash_tx("x2", "node-1", "t2", 10_000, book.balance(stake("node-1"))))
    assert book.balance(stake("node-1")) == 0
    assert book.balance(TREASURY) == 600
    assert book.balance(MINT) == -1_000 and book.total() == 0


def test_the_book_refuses_an_overdraft_even_from_a_stale_balance() -> None:
    book = Book()
    book.apply(mint_tx("m1", user("eve"), 100))
    tx = escrow_tx("e1", "t1", user("eve"), 100, 100)
    book.apply(tx)
    stale = escrow_tx("e2", "t2", user("eve"), 100, 100)  # decided on an old balance
    with pytest.raises(InsufficientFunds, match="overdraw user:eve"):
        book.apply(stale)
    assert book.balance(user("eve")) == 0
