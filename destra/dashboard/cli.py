"""``destra dashboard``: serve the dashboard of the network the settings reach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from destra.cli_common import load_settings, service_addresses, settings_options


def serve(dsn: str, bootstrap: str | None, *, prefix: str, genesis: Any, schema: str,
          host: str, port: int, home: Path | None = None, blobs: Path | None = None) -> None:
    """Run the dashboard over ``dsn`` (and Kafka at ``bootstrap``, if any; the services
    whose metrics ``home`` lists; the blob store at ``blobs`` for large sealed results)
    until stopped."""
    import uvicorn

    from destra.dashboard import pages
    from destra.dashboard.app import create_app
    from destra.dashboard.hub import Follower, Hub
    from destra.dashboard.sealed import SealedReader
    from destra.dashboard.services import Scraper

    follower = Follower(bootstrap, prefix, genesis) if bootstrap else None
    hub = Hub(dsn, schema=schema, follower=follower, render=pages.render,
              scraper=Scraper(home) if home is not None else None)
    sealed = (SealedReader(bootstrap, prefix, genesis, blobs)
              if bootstrap else None)
    uvicorn.run(create_app(hub, sealed), host=host, port=port, log_level="warning", ws="none")


@click.command("dashboard")
@settings_options
@click.option("--port", type=click.IntRange(0, 65535), default=8050, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (the default: this machine only).")
@click.option("--schema", default="public", show_default=True,
              help="Postgres schema the projector writes the views to.")
@click.option("--metrics-home", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="The DESTRA_HOME whose metrics/ lists the services to "
              "scrape (default: the settings' home).")
def dashboard(port: int, host: str, schema: str, metrics_home: Path | None,
              **flags: Any) -> None:
    """Serve the web dashboard: tasks, operators, the network, governance; live."""
    settings = load_settings(**flags)
    bootstrap, dsn = service_addresses(settings)
    click.echo(f"dashboard of network {settings.topic_prefix.rstrip('.') or '(no prefix)'} "
               f"on http://{host}:{port}/ (Ctrl-C stops it)")
    serve(dsn, bootstrap, prefix=settings.topic_prefix, genesis=settings.genesis_path,
          schema=schema, host=host, port=port, home=metrics_home or settings.home,
          blobs=settings.blobs)
