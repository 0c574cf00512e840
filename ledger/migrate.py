"""Schema migrations for the Postgres projection: numbered SQL files, applied once.

Idempotent and safe to run from several processes at once: an advisory lock
serialises them and ``schema_migrations`` records what is applied.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import sql

from destra.errors import InfraError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_LOCK_KEY = 0x44455354  # "DEST": any constant shared by every migrating process


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    """The migration files in the order they apply (by their numeric prefix)."""
    return sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def apply_migrations(
    dsn: str, schema: str = "public", directory: Path = MIGRATIONS_DIR
) -> list[str]:
    """Apply the pending migrations into ``schema``; returns the names applied."""
    applied: list[str] = []
    try:
        with psycopg.connect(dsn, autocommit=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(schema)))
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(
                sql.Identifier(schema)))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for path in migration_files(directory):
                if path.name in done:
                    continue
                conn.execute(path.read_text())  # type: ignore[arg-type]
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied.append(path.name)
            conn.commit()
    except psycopg.Error as e:
        raise InfraError(f"migrations failed on {dsn}: {e}") from e
    return applied
