"""A node on another machine joins: `destra infra up --advertise` offers the broker at an
address other than loopback, named in its certificate, and a node's own credentials
connect there with the broker's hostname checked.

"Another machine" is another address of this one that works offline: 127.0.0.2 (all of
127/8 is loopback on Linux). The advertised listener binds every local address, so the
same port also answers at 127.0.0.3, a name the certificate lacks: that client is refused.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, Producer

from infra.procs import pid_alive
from infra.tls import broker_hosts, tls_files
from streams.admin import live_broker_count
from streams.klog import KAFKA_LOG
from streams.security import KafkaAccess, client_config
from streams.topics import topic_for
from tests.support import free_port_block

pytestmark = pytest.mark.integration

REMOTE, UNNAMED = "127.0.0.2", "127.0.0.3"


def _destra(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "destra", *args], env=env, text=True,
                          capture_output=True, timeout=300, check=False)


def _reachable(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def test_a_node_connects_through_the_advertised_address_and_its_name_is_checked(
        tmp_path: Path) -> None:
    if not (_reachable(REMOTE) and _reachable(UNNAMED)):
        pytest.skip("127.0.0.2/127.0.0.3 are not local addresses here")
    port = free_port_block(1)
    external = free_port_block(1)
    home = tmp_path / "home"
    env = dict(os.environ, DESTRA_HOME=str(home), DESTRA_KAFKA_PORT=str(port),
               DESTRA_KAFKA_HEAP_MB="256")
    for var in ("DESTRA_KAFKA_BOOTSTRAP", "DESTRA_PG_DSN", "DESTRA_KAFKA_CREDENTIALS",
                "DESTRA_KAFKA_INSECURE", "DESTRA_KAFKA_ADVERTISE"):
        env.pop(var, None)

    up = _destra(env, "infra", "up", "--advertise", f"{REMOTE}:{external}", "--json")
    assert up.returncode == 0, up.stderr
    status = json.loads(up.stdout)
    pids = [b["pid"] for b in status["kafka"]["brokers"]] + [status["postgres"]["pid"]]
    try:
        assert status["kafka"]["advertised"] == [f"{REMOTE}:{external}"]
        # The local processes keep the loopback listener; the certificate names the new host.
        assert status["kafka"]["bootstrap"] == f"127.0.0.1:{port}"
        assert REMOTE in broker_hosts(tls_files(home / "tls"))
        assert json.loads((home / "kafka-advertise.json").read_text()) == {
            "advertise": [f"{REMOTE}:{external}"]}
        text = _destra(env, "infra", "status")
        assert f"advertised to other machines at {REMOTE}:{external}" in text.stdout

        joined = _destra(env, "node", "join", "gpu-7")
        assert joined.returncode == 0, joined.stderr
        node = KafkaAccess.load(home / "nodes" / "gpu-7" / "kafka.json")

        # Through the advertised address: the metadata names it, and a write the node's
        # ACLs allow goes through (TLS hostname checked against the certificate's SAN).
        remote = f"{REMOTE}:{external}"
        config = client_config(remote, node)
        assert config["ssl.endpoint.identification.algorithm"] == "https"
        producer = Producer({**config, "acks": "all", "message.timeout.ms": 15_000,
                             "logger": KAFKA_LOG})
        brokers = producer.list_topics(timeout=15).brokers
        assert [(b.host, b.port) for b in brokers.values()] == [(REMOTE, external)]
        errors: list[KafkaError | None] = []
        producer.produce(topic_for("NodeHeartbeat").name("destra."), b"ping", key=b"gpu-7",
                         on_delivery=lambda err, msg: errors.append(err))
        producer.flush(20)
        assert errors == [None]

        # The same listener at an address the certificate does not name: refused by TLS.
        failures: list[KafkaError] = []
        unnamed = Producer({**client_config(f"{UNNAMED}:{external}", node),
                            "logger": KAFKA_LOG, "error_cb": failures.append})
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            unnamed.poll(0.1)
        # librdkafka reports the failed handshake as _SSL or, at times, as _TRANSPORT: the
        # reason is what must be there.
        assert failures and failures[0].code() in (KafkaError._SSL, KafkaError._TRANSPORT), \
            failures
        assert "certificate verify failed" in failures[0].str(), failures
        assert live_broker_count(f"{UNNAMED}:{external}", 3.0, node) == 0

        # Asked for a running broker at another address: told to restart it, nothing done.
        other = _destra(env, "infra", "up", "--advertise", f"{UNNAMED}:{external}")
        assert other.returncode == 1 and "infra down" in other.stderr
    finally:
        down = _destra(env, "infra", "down")
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(p) for p in pids)
