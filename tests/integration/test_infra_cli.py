"""`destra infra up | status | down` as a user runs them, in their own processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.procs import pid_alive
from streams import security
from streams.admin import describe_topics, live_broker_count
from streams.security import SERVICES, KafkaAccess
from streams.topics import TOPICS
from tests.support import eventually, free_port_block

pytestmark = pytest.mark.integration


def _destra(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "destra", *args], env=env, text=True,
                          capture_output=True, timeout=300, check=False)


def test_infra_up_status_down_leaves_nothing_running(tmp_path: Path) -> None:
    env = dict(os.environ, DESTRA_HOME=str(tmp_path / "home"),
               DESTRA_KAFKA_PORT=str(free_port_block(1)), DESTRA_KAFKA_HEAP_MB="256")
    env.pop("DESTRA_KAFKA_BOOTSTRAP", None)
    env.pop("DESTRA_PG_DSN", None)

    # Up: both services start and report themselves.
    up = _destra(env, "infra", "up", "--json")
    assert up.returncode == 0, up.stderr
    status = json.loads(up.stdout)
    assert status["running"] is True
    assert status["kafka"]["live_brokers"] == 1 and status["kafka"]["version"] == "4.4.0"
    assert status["postgres"]["version"].startswith("18")
    pids = [b["pid"] for b in status["kafka"]["brokers"]] + [status["postgres"]["pid"]]
    assert all(pid_alive(p) for p in pids)

    home = tmp_path / "home"
    before = security.current()
    try:
        # Secured by default: its CA and broker key (0600) under DESTRA_HOME, the admin's and
        # each service's credentials (0600) beside the services' keys; no plaintext.
        assert status["kafka"]["secure"] is True
        assert (home / "tls" / "ca.pem").exists()
        for secret in [home / "tls" / "ca.key", home / "tls" / "broker.pem",
                       *(home / "services" / f"{r}.kafka.json" for r in ("admin", *SERVICES))]:
            assert secret.stat().st_mode & 0o777 == 0o600, secret
        bootstrap = status["kafka"]["bootstrap"]
        assert live_broker_count(bootstrap, 3.0, KafkaAccess.plaintext()) == 0

        # Every catalogue topic exists with its cleanup policy and retention.
        security.use(KafkaAccess.load(home / "services" / "admin.kafka.json"))
        described = {t.name: t for t in describe_topics(bootstrap, "destra.")}
        for spec in TOPICS:
            topic = described[spec.name("destra.")]
            assert topic.partitions == spec.partitions
            assert topic.config["cleanup.policy"] == spec.cleanup
            assert topic.config["retention.ms"] == str(spec.retention_ms)

        # Up again is idempotent: the same processes, nothing new.
        again = _destra(env, "infra", "up", "--json")
        assert again.returncode == 0, again.stderr
        assert [b["pid"] for b in json.loads(again.stdout)["kafka"]["brokers"]] == pids[:1]

        text = _destra(env, "infra", "status")
        assert "kafka     up" in text.stdout and "postgres  up" in text.stdout
    finally:
        security.use(before)
        down = _destra(env, "infra", "down")
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(p) for p in pids)

    after = _destra(env, "infra", "status", "--json")
    assert json.loads(after.stdout)["running"] is False


def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    env = dict(os.environ, DESTRA_HOME=str(tmp_path), DESTRA_KAFKA_BROKERS="2")
    result = _destra(env, "infra", "status")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: kafka_brokers must be 1 or 3, got 2"


def test_topics_of_an_older_network_get_the_catalogues_settings(kafka: str) -> None:
    """A network made before a topic started stamping broker time is upgraded in place:
    ``ensure_topics`` (run by ``infra up``) sets the catalogue's settings on topics that
    exist, and keeps their data and partitions."""
    from dataclasses import replace

    from streams.admin import ensure_topics
    from streams.topics import topic_for

    prefix = f"old{os.getpid()}."
    submitted = topic_for("TaskSubmitted")
    assert submitted.broker_time
    older = [replace(s, broker_time=False) if s is submitted else s for s in TOPICS]
    ensure_topics(kafka, prefix, replication_factor=1, min_insync_replicas=1, specs=older)
    name = submitted.name(prefix)
    before = {t.name: t for t in describe_topics(kafka, prefix)}[name]
    assert before.config["message.timestamp.type"] == "CreateTime"

    assert ensure_topics(kafka, prefix, replication_factor=1, min_insync_replicas=1) == []

    def upgraded() -> bool:
        # The controller has the change when ensure_topics returns; the broker's metadata
        # view, which describe reads, follows a moment later.
        return {t.name: t for t in describe_topics(kafka, prefix)}[name].config[
            "message.timestamp.type"] == "LogAppendTime"

    eventually(upgraded, timeout=10)
    after = {t.name: t for t in describe_topics(kafka, prefix)}[name]
    assert after.partitions == before.partitions
