"""`destra mint` and `destra balance` through the ledger processor and projection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from destra.cli import cli
from destra.settings import Settings
from ledger import processor
from ledger.projection import LedgerProjection
from ledger.service import project_to_now
from schemas import encode
from streams import reading, security
from tests.support import registration

pytestmark = pytest.mark.integration


def test_minted_tokens_reach_the_balance_the_cli_shows(
    network: Settings, kafka: str, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dict(os.environ, DESTRA_KAFKA_BOOTSTRAP=kafka, DESTRA_PG_DSN=pg_dsn,
               DESTRA_TOPIC_PREFIX=network.topic_prefix,
               DESTRA_GENESIS=str(network.genesis_path),
               DESTRA_SERVICE_KEYS=str(network.service_keys), DESTRA_HOME=str(tmp_path),
               DESTRA_PASSPHRASE="test passphrase")

    def destra(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "destra", *args], env={**env, **extra},
                              text=True, capture_output=True, timeout=120, check=False)

    # No mint to an account that is not registered; alice is, and the ledger reads her
    # registration before the mints (it reads the registry and the mints independently).
    unknown = destra("mint", "alice", "5")
    assert unknown.returncode == 1 and "account alice is not registered" in unknown.stderr
    created = destra("account", "create", "alice")
    assert created.returncode == 0, created.stderr
    processor.run(network, kafka, idle_exit_s=3)

    # No ledger running: no decision within the timeout, exit 1 (the ledger credits it
    # once it runs).
    pending = destra("mint", "alice", "5", "--timeout", "2", "--json")
    assert pending.returncode == 1, pending.stderr
    assert json.loads(pending.stdout)["outcome"] == "pending"

    stop = threading.Event()
    ledger = threading.Thread(target=processor.run, args=(network, kafka),
                              kwargs={"running": lambda: not stop.is_set()})
    ledger.start()
    try:
        # Two mints, each waiting for the ledger's entries; two refused by the CLI before
        # anything is sent: a bad amount, and an operator without the treasury key.
        credited = destra("mint", "alice", "1500000")
        assert credited.returncode == 0, credited.stderr
        assert "credited by the ledger" in credited.stdout
        as_json = destra("mint", "alice", "2500", "--json")
        assert as_json.returncode == 0, as_json.stderr
        answer = json.loads(as_json.stdout)
        assert (answer["outcome"], answer["amount_micro"], answer["reason"]) == (
            "credited", 2500, None)
        refused = destra("mint", "alice", "0")
        assert refused.returncode == 2 and "AMOUNT_MICRO" in refused.stderr
        keyless = destra("mint", "alice", "7",
                         DESTRA_SERVICE_KEYS=str(network.service_keys.parent / "no-keys"))
        assert keyless.returncode == 1 and "no treasury key" in keyless.stderr

        # The ledger's refusal is reported with its reason, exit 1: bob's registration is
        # seen on the registry by the CLI (as when the ledger has not read it yet) but
        # the ledger has none.
        real_read_all = reading.read_all

        def registry_with_bob(bootstrap: str, topic: str, start: Any = None) -> list[Any]:
            if topic.endswith("accounts.registry"):
                return [_Record(encode(registration("bob")))]
            return real_read_all(bootstrap, topic, start)

        monkeypatch.setattr(reading, "read_all", registry_with_bob)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        access = security.current()  # the CLI chooses the treasury's principal in-process
        try:
            result = CliRunner().invoke(cli, ["mint", "bob", "900", "--json"])
        finally:
            security.use(access)
            monkeypatch.setattr(reading, "read_all", real_read_all)
        assert result.exit_code == 1, result.output
        answer = json.loads(result.stdout)
        assert answer["outcome"] == "refused"
        assert answer["reason"].startswith("unregistered-account: mint " + answer["event_id"])
        text = destra("mint", "alice", "1", "--timeout", "0")
        assert text.returncode == 0 and "sent" in text.stdout
    finally:
        stop.set()
        ledger.join(timeout=60)

    # The processor posts the entries; the projection folds them into Postgres.
    processor.run(network, kafka, idle_exit_s=3)
    projection = LedgerProjection(pg_dsn)
    try:
        project_to_now(network, kafka, projection)
    finally:
        projection.close()

    shown = destra("balance", "alice", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"account": "user:alice", "balance_micro": 1_502_506}
    assert json.loads(destra("balance", "mint", "--json").stdout)["balance_micro"] == -1_502_506
    assert json.loads(destra("balance", "bob", "--json").stdout)["balance_micro"] == 0


class _Record:
    """A registry record as ``read_all`` returns it."""

    def __init__(self, value: bytes) -> None:
        self._value = value

    def value(self) -> bytes:
        return self._value
