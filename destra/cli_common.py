"""What the ``destra`` command modules share: settings flags, output, service addresses.

Kept apart from ``destra.cli`` so that the command modules it registers
(``views_cli``, ``keys_cli``) import these helpers without importing ``cli``
back: no import cycle.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from destra.errors import DestraError
from destra.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(f: F) -> F:
    """Flags that override the ``DESTRA_*`` environment for one command."""
    options = [
        click.option("--home", type=click.Path(path_type=Path), default=None,
                     help="State, data and logs of local services [DESTRA_HOME]."),
        click.option("--kafka-bootstrap", default=None,
                     help="External Kafka to use instead of a local one [DESTRA_KAFKA_BOOTSTRAP]."),
        click.option("--pg-dsn", default=None,
                     help="External Postgres instead of the embedded one [DESTRA_PG_DSN]."),
        click.option("--brokers", "kafka_brokers", type=click.IntRange(1, 3), default=None,
                     help="Local Kafka brokers: 1, or 3 for replication [DESTRA_KAFKA_BROKERS]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def load_settings(**flags: Any) -> Settings:
    """The settings from the ``DESTRA_*`` environment, overridden by the command's flags."""
    return Settings.from_env(**flags)


def emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    """Print ``data`` as indented JSON, or as ``text(data)``."""
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text(data))


def passphrase() -> bytes | None:
    """The keystore passphrase: the environment's, else asked for on a terminal."""
    from destra import keystore

    if keystore.passphrase_from_env() is None and sys.stdin.isatty():
        return str(click.prompt("keystore passphrase", hide_input=True)).encode()
    return None


def kafka_address(settings: Settings, services: Any, *, node: str | None = None,
                  account: str | None = None, role: str | None = None) -> str:
    """The Kafka bootstrap: the configured one, else the one ``destra infra up`` started.

    Also chooses this process's principal (``streams.security.configure``): the file
    ``DESTRA_KAFKA_CREDENTIALS`` names, else plaintext for an insecure network, else
    the credentials of the node, the account or the service ``role`` given, else the
    operator's (``admin``).
    """
    from destra import keystore
    from streams import security

    state = services.read_state(settings)
    if settings.kafka_bootstrap:
        bootstrap = settings.kafka_bootstrap
    elif state is None:
        raise DestraError("no Kafka: run `destra infra up` or set DESTRA_KAFKA_BOOTSTRAP")
    else:
        bootstrap = str(state.kafka_bootstrap)
    if node is not None:
        credentials = keystore.node_credentials(settings, node)
        hint = f"ask the network's operator for them (`destra node join {node}`)"
    elif account is not None:
        credentials = keystore.account_credentials(settings, account)
        hint = f"ask the network's operator for them (`destra account create {account}`)"
    else:
        credentials = security.service_credentials(settings.service_keys, role or security.ADMIN)
        hint = "`destra infra up` makes them; or set DESTRA_KAFKA_CREDENTIALS"
    insecure = settings.kafka_insecure or (
        state is not None and not settings.kafka_bootstrap and not state.kafka_secure)
    if not insecure and not credentials.exists() and not os.environ.get(
            "DESTRA_KAFKA_CREDENTIALS"):
        raise DestraError(f"no Kafka credentials at {credentials}: {hint}")
    security.configure(credentials, insecure=insecure)
    return bootstrap


def service_addresses(settings: Settings) -> tuple[str, str]:
    """(Kafka bootstrap, Postgres DSN): configured, else those ``destra infra up`` started."""
    from infra import services

    state = services.read_state(settings)
    dsn = settings.pg_dsn or (state.pg_dsn if state else None)
    if not dsn:
        raise DestraError("no Postgres: run `destra infra up` or set DESTRA_PG_DSN")
    return kafka_address(settings, services), dsn
