"""What the ``destra`` command modules share: settings flags, output, service addresses.

Kept apart from ``destra.cli`` so that the command modules it registers
(``views_cli``, ``keys_cli``) import these helpers without importing ``cli``
back: no import cycle.
"""

from __future__ import annotations

import json
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


def kafka_address(settings: Settings, services: Any) -> str:
    """The Kafka bootstrap: the configured one, else the one ``destra infra up`` started."""
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    state = services.read_state(settings)
    if state is None:
        raise DestraError("no Kafka: run `destra infra up` or set DESTRA_KAFKA_BOOTSTRAP")
    return str(state.kafka_bootstrap)


def service_addresses(settings: Settings) -> tuple[str, str]:
    """(Kafka bootstrap, Postgres DSN): configured, else those ``destra infra up`` started."""
    from infra import services

    state = services.read_state(settings)
    dsn = settings.pg_dsn or (state.pg_dsn if state else None)
    if not dsn:
        raise DestraError("no Postgres: run `destra infra up` or set DESTRA_PG_DSN")
    return kafka_address(settings, services), dsn
