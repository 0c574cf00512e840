"""The processors worker killed with SIGKILL, on a real broker: nothing in flight is lost.

Its allocator and verifier snapshot their state in the same Kafka transaction
as their outputs (``streams.kafka_runner``), so a restarted worker knows every
task in flight and every node, and a task submitted right after a restart is
placed without any node registering again.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from destra.client import Client
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from schemas import Event, decode
from streams.reading import read_all
from streams.topics import topic_for

pytestmark = pytest.mark.integration


def _events(net: LocalNetwork, name: str) -> list[Event]:
    topic = topic_for(name).name(net.settings.topic_prefix)
    return [e for e in (decode(m.value()) for m in read_all(net.bootstrap, topic))
            if e.name == name]


@pytest.fixture
def net(network: Settings, kafka: str, pg_dsn: str, tmp_path: Path) -> Iterator[LocalNetwork]:
    settings = network.with_(home=tmp_path / "home")
    local = LocalNetwork(settings, kafka, create_database(pg_dsn), tmp_path / "logs", env_extra={
        "DESTRA_COMMIT_WINDOW_MS": "20000", "DESTRA_REVEAL_WINDOW_MS": "10000"})
    local.mint("alice", "op-a", "op-b", "op-c")
    yield local
    local.stop()


def test_a_killed_processors_worker_restarts_with_its_tasks_and_nodes(net: LocalNetwork) -> None:
    nodes = ["a", "b", "c"]
    net.start_services()
    for n in nodes:
        net.start_node(n, operator=f"op-{n}", slots=2)
    net.wait_registered(nodes)
    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    watch = client.watch()

    # Twenty tasks in flight, then the worker dies mid-stream and comes back.
    tasks = [client.submit(client.quote("heat2d", {"grid": "16", "steps": "50",
                                                   "seed": str(i)}), flush=False)
             for i in range(20)]
    client.flush()
    deadline = time.monotonic() + 60
    while not _events(net, "TaskAssigned"):
        assert time.monotonic() < deadline, "nothing was assigned"
        time.sleep(0.05)
    net.kill("processors", signal.SIGKILL)
    net.spawn("processors", "-m", "destra.processors")
    done = client.wait(tasks, watch=watch, timeout_s=240)
    assert {t: p.state for t, p in done.items()} == dict.fromkeys(tasks, "verified"), (
        [e.fields for e in _events(net, "TaskFailed")],
        [(e.fields["reason"], e.fields["source_topic"]) for e in _events(net, "DeadLettered")])

    # Killed again when idle: a task submitted at once is placed from the restored table.
    net.kill("processors", signal.SIGKILL)
    net.spawn("processors", "-m", "destra.processors")
    last = client.submit(client.quote("heat2d", {"grid": "8", "steps": "1"}))
    done = client.wait([last], watch=watch, timeout_s=120)
    assert done[last].state == "verified", done[last].as_dict()
    watch.close()
    client.close()
    net.check_alive()

    # Exactly once across both kills: one verdict per task, one assignment per replica.
    verdicts = Counter(e.fields["task_id"] for e in _events(net, "TaskVerified"))
    assert verdicts == Counter({t: 1 for t in [*tasks, last]})
    replicas = Counter((e.fields["task_id"], e.fields["replica_index"], e.fields["attempt"])
                       for e in _events(net, "TaskAssigned"))
    assert max(replicas.values()) == 1
    registrations = Counter(e.fields["node_id"] for e in _events(net, "NodeRegistered"))
    assert registrations == Counter(dict.fromkeys(nodes, 1))
