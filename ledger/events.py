"""Mapping between ledger transactions and their LedgerEntryPosted events."""

from __future__ import annotations

from ledger.book import Transaction
from schemas import Event, new_event


def entry_events(tx: Transaction, producer_id: str) -> list[Event]:
    """One LedgerEntryPosted per posting; entry ids derive from the transaction id.

    Deterministic ids make a re-sent transaction (after a crash of its sender)
    collide with the first one in the projection instead of paying twice.
    """
    return [
        new_event(
            "LedgerEntryPosted", producer_id,
            entry_id=f"{tx.transaction_id}/{i}",
            transaction_id=tx.transaction_id,
            account=p.account,
            amount_micro=p.amount_micro,
            kind=p.kind,
            task_id=tx.task_id,
            memo=tx.memo,
        )
        for i, p in enumerate(tx.postings)
    ]
