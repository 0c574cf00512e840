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

import pytest

from destra.client import Client
from destra.network import LocalNetwork

pytestmark = pytest.mark.integration



@pytest.fixture
def net(three_operators: LocalNetwork) -> LocalNetwork:
    return three_operators


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
    while not net.events("TaskAssigned"):
        assert time.monotonic() < deadline, "nothing was assigned"
        time.sleep(0.05)
    net.kill("processors", signal.SIGKILL)
    net.spawn("processors", "-m", "destra.processors")
    done = client.wait(tasks, watch=watch, timeout_s=240)
    assert {t: p.state for t, p in done.items()} == dict.fromkeys(tasks, "verified"), (
        [e.fields for e in net.events("TaskFailed")],
        [(e.fields["reason"], e.fields["source_topic"]) for e in net.events("DeadLettered")])

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
    verdicts = Counter(e.fields["task_id"] for e in net.events("TaskVerified"))
    assert verdicts == Counter({t: 1 for t in [*tasks, last]})
    replicas = Counter((e.fields["task_id"], e.fields["replica_index"], e.fields["attempt"])
                       for e in net.events("TaskAssigned"))
    assert max(replicas.values()) == 1
    registrations = Counter(e.fields["node_id"] for e in net.events("NodeRegistered"))
    assert registrations == Counter(dict.fromkeys(nodes, 1))
