"""``destra keys``: create, show and rotate the passphrase-encrypted keys of accounts and nodes.

The passphrase comes from ``DESTRA_PASSPHRASE`` or ``DESTRA_PASSPHRASE_FILE``
when set, else from a hidden prompt. The group is registered on ``destra`` by
``destra.cli``, which prints the ``DestraError`` these commands raise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from destra import keystore
from destra.errors import KeystoreError
from destra.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


def _owner_options(f: F) -> F:
    """``--account`` / ``--node`` (exactly one) and ``--home``."""
    options = [
        click.option("--account", default=None, help="The account whose keys these are."),
        click.option("--node", default=None, help="The node whose keys these are."),
        click.option("--home", type=click.Path(path_type=Path), default=None,
                     help="Where keystores live: accounts/ and nodes/ [DESTRA_HOME]."),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _locate(account: str | None, node: str | None, home: Path | None) -> tuple[str, str, Path]:
    """(``account`` or ``node``, its name, its keystore path)."""
    if (account is None) == (node is None):
        raise click.UsageError("give exactly one of --account NAME or --node NAME")
    settings = Settings.from_env(home=home)
    if account is not None:
        return "account", account, keystore.account_path(settings, account)
    assert node is not None
    return "node", node, keystore.node_path(settings, node)


def _passphrase(*, confirm: bool) -> bytes:
    """The passphrase from the environment, else asked for without echo."""
    passphrase = keystore.passphrase_from_env()
    if passphrase is None:
        passphrase = click.prompt("Keystore passphrase", hide_input=True,
                                  confirmation_prompt=confirm, err=True).encode()
    return passphrase


def _report(kind: str, name: str, path: Path, as_json: bool) -> None:
    info = {kind: name, "path": str(path), **keystore.public_keys(path)}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo("\n".join([
        f"{kind} {name}",
        f"  path               {path}",
        f"  signing public     {info['signing']}",
        f"  encryption public  {info['encryption']}",
        f"  fingerprint        {info['fingerprint']}",
        f"  previous keys      {info['previous_keys']}",
        *([] if info["encrypted"] else ["  (plaintext legacy file: any passphrase command "
                                         "encrypts it)"]),
    ]))


@click.group()
def keys() -> None:
    """Create, show and rotate the encrypted keys of accounts and nodes."""


@keys.command("create")
@_owner_options
def create(account: str | None, node: str | None, home: Path | None, as_json: bool) -> None:
    """Generate keys and seal them in a new keystore (never overwrites one)."""
    kind, name, path = _locate(account, node, home)
    if path.exists():
        raise KeystoreError(f"a keystore already exists at {path}")
    keystore.create(path, _passphrase(confirm=True))
    _report(kind, name, path, as_json)


@keys.command("show")
@_owner_options
def show(account: str | None, node: str | None, home: Path | None, as_json: bool) -> None:
    """Public keys, fingerprint and rotated-out key count (no passphrase needed)."""
    kind, name, path = _locate(account, node, home)
    _report(kind, name, path, as_json)


@keys.command("rotate")
@_owner_options
@click.option("--new-passphrase-file", type=click.Path(path_type=Path), default=None,
              help="Re-encrypt under the passphrase in this file (one trailing newline "
                   "stripped).")
def rotate(account: str | None, node: str | None, home: Path | None, as_json: bool,
           new_passphrase_file: Path | None) -> None:
    """A new encryption key; the old one is kept to open what was sealed to it.

    The signing key (the identity the network binds you to) stays the same. A node
    publishes its new encryption key when it next starts; a submitter's new key
    goes with its next submission.
    """
    kind, name, path = _locate(account, node, home)
    new_passphrase = (None if new_passphrase_file is None
                      else keystore.read_passphrase_file(new_passphrase_file))
    keystore.public_keys(path)  # a missing or malformed keystore fails before any prompt
    keystore.rotate(path, _passphrase(confirm=False), new_passphrase)
    _report(kind, name, path, as_json)
