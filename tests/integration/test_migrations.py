"""Schema migrations apply once, against a real PostgreSQL."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from ledger.migrate import apply_migrations, migration_files

pytestmark = pytest.mark.integration


def test_migrations_apply_once_and_are_idempotent(pg_dsn: str) -> None:
    schema = f"m_{uuid.uuid4().hex[:8]}"
    first = apply_migrations(pg_dsn, schema=schema)
    assert first == [p.name for p in migration_files()] and first
    assert apply_migrations(pg_dsn, schema=schema) == []
    with psycopg.connect(pg_dsn) as conn:
        applied = conn.execute(f"SELECT count(*) FROM {schema}.schema_migrations").fetchone()
        assert applied == (len(first),)
        # The offsets table enforces its invariants.
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(f"INSERT INTO {schema}.projection_offsets VALUES ('p', 't', 0, -1)")
