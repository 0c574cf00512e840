"""Mapping between ledger transactions and their LedgerEntryPosted events."""

from __future__ import annotations

from ledger.book import Transaction
from schemas import Event, new_event


def entry_events(tx: Transaction, producer_id: str, at_ms: int | None = None) -> list[Event]:
    """One LedgerEntryPosted per posting; entry ids derive from the transaction id.

    Deterministic ids make a re-sent transaction (after a crash of its sender)
    collide with the first one in the projection instead of paying twice.
    ``at_ms``, when given, is the entries' ``occurred_at``: the ledger stamps
    them with the record time of the input that decided them (the broker's
    append time for submissions, mints and penalties), which a rebuild uses to
    bound how long the transaction's id must be kept (``LedgerDecider.restore``).
    """
    return [
        new_event(
            "LedgerEntryPosted", producer_id,
            occurred_at=at_ms,
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
