"""The Postgres ledger projection: LedgerEntryPosted events folded into balances.

Exactly-once by construction: a batch of events, their entries, the balance
updates and the next offset of every partition they came from are written in
one Postgres transaction; on start the consumer resumes from the offsets
stored here, not from Kafka's group offsets. A crash anywhere (even SIGKILL
between two statements) rolls back to a consistent point, and the entry id
primary key refuses a second application even if an event were redelivered.

Entries are keyed by account on the topic, so each account's history stays
in order and a balance never goes negative midway through a replay, whatever
the interleaving of partitions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql

from destra.errors import DestraError
from ledger.migrate import apply_migrations
from streams.consumer import Delivery

PROJECTION = "ledger"

Refuse = Callable[[Delivery, Exception], None]
"""Called with a delivery Postgres refused to store, and why (``OffsetProjection.apply``)."""


class LedgerCorrupt(DestraError):
    """The ledger's entries do not sum to zero or disagree with its balances."""


@dataclass(frozen=True)
class Position:
    """Where the projection resumes on one partition."""

    topic: str
    partition: int
    next_offset: int


class OffsetProjection:
    """A Postgres projection that stores, with its rows, how far it has read.

    ``apply`` folds a batch and writes the next offset of every partition it
    came from in one transaction, under an advisory lock per schema and
    projection, skipping deliveries below the stored offsets (a redelivery
    after a restart): a crash anywhere never applies an event twice.
    Subclasses name themselves (``name``, the key in ``projection_offsets``)
    and fold one delivery in ``_fold``.
    """

    name: str = ""

    def __init__(self, dsn: str, schema: str = "public") -> None:
        self.dsn = dsn
        self.schema = schema
        apply_migrations(dsn, schema=schema)
        # Autocommit, so that each ``transaction()`` block is a real BEGIN/COMMIT and
        # never a savepoint inside a transaction some read left open.
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))

    def positions(self) -> dict[tuple[str, int], int]:
        """The next offset to read on each partition seen so far."""
        rows = self._conn.execute(
            "SELECT topic, partition, next_offset FROM projection_offsets WHERE projection = %s",
            (self.name,),
        ).fetchall()
        return {(t, p): o for t, p, o in rows}

    def apply(self, deliveries: Iterable[Delivery], refuse: Refuse | None = None,
              passed: Mapping[tuple[str, int], int] | None = None) -> int:
        """Apply a batch in one transaction; returns how many deliveries changed something.
        ``passed``: further positions to store with it (past records the consumer
        dead-lettered, which never reach here).

        A value Postgres refuses (``psycopg.DataError``: a NUL in a text, a number out of
        a column's range) fails the batch; with ``refuse``, the batch is applied again
        with a savepoint around each delivery, and each one Postgres refuses is handed to
        ``refuse`` (which dead-letters it) before the transaction commits, its effects
        undone and its offset passed, so the projection goes on past it. Without
        ``refuse`` the error is raised."""
        deliveries = list(deliveries)
        try:
            return self._apply(deliveries, None, passed)
        except psycopg.DataError:
            if refuse is None:
                raise
        return self._apply(deliveries, refuse, passed)

    def _apply(self, deliveries: list[Delivery], refuse: Refuse | None,
               passed: Mapping[tuple[str, int], int] | None) -> int:
        ends: dict[tuple[str, int], int] = dict(passed or {})
        for d in deliveries:  # events the projection ignores still advance the offset
            ends[(d.topic, d.partition)] = max(ends.get((d.topic, d.partition), 0), d.offset + 1)
        applied = 0
        with self._conn.transaction():
            # One writer at a time per schema and projection; positions read under the lock.
            self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                               (f"{self.schema}/{self.name}",))
            done = self.positions()
            for d in deliveries:
                if d.offset < done.get((d.topic, d.partition), 0):
                    continue  # already applied before a restart
                if refuse is None:
                    applied += self._fold(d)
                    continue
                try:
                    with self._conn.transaction():  # a savepoint: undoes this delivery only
                        applied += self._fold(d)
                except psycopg.DataError as err:
                    refuse(d, err)
            for (topic, partition), next_offset in ends.items():
                self._conn.execute(
                    "INSERT INTO projection_offsets (projection, topic, partition, next_offset)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (projection, topic, partition)"
                    " DO UPDATE SET next_offset = GREATEST(projection_offsets.next_offset,"
                    " EXCLUDED.next_offset), updated_at = now()",
                    (self.name, topic, partition, next_offset),
                )
        return applied

    def _fold(self, d: Delivery) -> int:
        """Apply one delivery inside ``apply``'s transaction; 1 if it changed something."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


class LedgerProjection(OffsetProjection):
    """Folds ledger entry events into ``ledger_entries`` and ``ledger_accounts``."""

    name = PROJECTION

    def apply(self, deliveries: Iterable[Delivery], refuse: Refuse | None = None,
              passed: Mapping[tuple[str, int], int] | None = None) -> int:
        """Apply a batch in one transaction; returns how many entries were new."""
        try:
            return super().apply(deliveries, refuse, passed)
        except psycopg.errors.CheckViolation as e:
            raise LedgerCorrupt(f"an entry would overdraw an account: {e}") from e

    def _fold(self, d: Delivery) -> int:
        return self._apply_entry(d) if d.event.name == "LedgerEntryPosted" else 0

    def _apply_entry(self, d: Delivery) -> int:
        f = d.event.fields
        inserted = self._conn.execute(
            "INSERT INTO ledger_entries (entry_id, transaction_id, account, amount_micro, kind,"
            " task_id, memo, topic, partition, \"offset\", occurred_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (entry_id) DO NOTHING",
            (f["entry_id"], f["transaction_id"], f["account"], f["amount_micro"], f["kind"],
             f["task_id"], f["memo"], d.topic, d.partition, d.offset, d.event.occurred_at),
        ).rowcount
        if inserted:
            # UPDATE first: an upsert would test the CHECK on the proposed row
            # (a debit alone) before finding the existing account.
            updated = self._conn.execute(
                "UPDATE ledger_accounts SET balance_micro = balance_micro + %s WHERE account = %s",
                (f["amount_micro"], f["account"]),
            ).rowcount
            if not updated:
                self._conn.execute(
                    "INSERT INTO ledger_accounts (account, balance_micro) VALUES (%s, %s)",
                    (f["account"], f["amount_micro"]),
                )
        return inserted

    def balances(self) -> Mapping[str, int]:
        """Every account's balance, non-zero ones only, sorted by account."""
        rows = self._conn.execute(
            "SELECT account, balance_micro FROM ledger_accounts"
            " WHERE balance_micro <> 0 ORDER BY account").fetchall()
        return dict(rows)

    def check(self) -> int:
        """Verify entries sum to zero and balances equal their entries; returns entry count."""
        total, count = self._conn.execute(
            "SELECT coalesce(sum(amount_micro), 0), count(*) FROM ledger_entries"
        ).fetchone() or (0, 0)
        mismatched = self._conn.execute(
            "SELECT count(*) FROM ledger_accounts a FULL JOIN"
            " (SELECT account, sum(amount_micro) AS s FROM ledger_entries GROUP BY account) e"
            " USING (account) WHERE coalesce(a.balance_micro, 0) <> coalesce(e.s, 0)").fetchone()
        if total != 0:
            raise LedgerCorrupt(f"ledger entries sum to {total}, not 0")
        if mismatched and mismatched[0]:
            raise LedgerCorrupt(f"{mismatched[0]} account balances disagree with their entries")
        return int(count)

    def content_hash(self) -> str:
        """SHA-256 over entries and balances, independent of arrival order and offsets."""
        h = hashlib.sha256()
        for row in self._conn.execute(
            "SELECT entry_id, transaction_id, account, amount_micro, kind, task_id, memo"
            " FROM ledger_entries ORDER BY entry_id"):
            h.update(repr(row).encode())
        for row in self._conn.execute(
            "SELECT account, balance_micro FROM ledger_accounts ORDER BY account"):
            h.update(repr(row).encode())
        return h.hexdigest()
