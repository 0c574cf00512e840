"""`destra mint` and `destra balance` through the ledger processor and projection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from destra.settings import Settings
from ledger import processor
from ledger.projection import LedgerProjection
from ledger.service import project_to_now

pytestmark = pytest.mark.integration


def test_minted_tokens_reach_the_balance_the_cli_shows(
    network: Settings, kafka: str, pg_dsn: str, tmp_path: Path
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

    # Two mints, and two refused by the CLI before anything is sent: a bad amount, and
    # an operator without the treasury key.
    assert destra("mint", "alice", "1500000").returncode == 0
    assert destra("mint", "alice", "2500").returncode == 0
    refused = destra("mint", "alice", "0")
    assert refused.returncode == 2 and "AMOUNT_MICRO" in refused.stderr
    keyless = destra("mint", "alice", "7",
                     DESTRA_SERVICE_KEYS=str(network.service_keys.parent / "no-keys"))
    assert keyless.returncode == 1 and "no treasury key" in keyless.stderr

    # The processor posts the entries; the projection folds them into Postgres.
    processor.run(network, kafka, idle_exit_s=3)
    projection = LedgerProjection(pg_dsn)
    try:
        project_to_now(network, kafka, projection)
    finally:
        projection.close()

    shown = destra("balance", "alice", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"account": "user:alice", "balance_micro": 1_502_500}
    assert json.loads(destra("balance", "mint", "--json").stdout)["balance_micro"] == -1_502_500
