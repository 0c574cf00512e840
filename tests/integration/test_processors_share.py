"""Two processors workers share the units of work; killing one moves its units to the other.

The units (``streams.leases``: the allocator and the verifier's task shards) are
leased through one consumer group. Each worker signs its outputs under its own
producer id, so the log shows who judged what: both workers judge tasks while
both live, and the tasks the killed one had in flight are judged by the other.
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
from streams.leases import Shard, holders
from tests.support import TEARDOWN_GRACE_S

pytestmark = pytest.mark.integration

UNITS = {"allocator", "verifier-0of2", "verifier-1of2"}



def _wait_holders(net: LocalNetwork, workers: set[str], timeout_s: float) -> dict[str, list[str]]:
    """The lease map once exactly ``workers`` hold every unit between them."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = holders(net.bootstrap, net.settings.topic_prefix)
        if set(held) == workers and {u for us in held.values() for u in us} == UNITS:
            return held
        assert time.monotonic() < deadline, f"leases never settled on {workers}: {held}"
        time.sleep(0.2)


@pytest.fixture
def net(network: Settings, kafka: str, pg_dsn: str, tmp_path: Path) -> Iterator[LocalNetwork]:
    settings = network.with_(home=tmp_path / "home")
    local = LocalNetwork(settings, kafka, create_database(pg_dsn), tmp_path / "logs", env_extra={
        "DESTRA_COMMIT_WINDOW_MS": "20000", "DESTRA_REVEAL_WINDOW_MS": "10000",
        "DESTRA_LEASE_SESSION_MS": "2000"})
    local.mint("alice", "op-a", "op-b", "op-c")
    yield local
    local.stop(timeout_s=TEARDOWN_GRACE_S)


def test_two_workers_share_the_units_and_one_takes_over_when_the_other_dies(
        net: LocalNetwork) -> None:
    nodes = ["a", "b", "c"]
    net.start_services()  # the first worker, "processors"
    net.spawn("processors-2", "-m", "destra.processors")
    held = _wait_holders(net, {"processors", "processors-2"}, 60)
    assert all(held.values()), held  # each holds at least one unit
    for n in nodes:
        net.start_node(n, operator=f"op-{n}", slots=2)
    net.wait_registered(nodes)
    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    watch = client.watch()

    def submit(count: int, first: int) -> list[str]:
        tasks = [client.submit(client.quote("heat2d", {"grid": "16", "steps": "50",
                                                       "seed": str(first + i)}), flush=False)
                 for i in range(count)]
        client.flush()
        return tasks

    # Both live: each judges the tasks of the shards it holds.
    before = submit(16, 0)
    done = client.wait(before, watch=watch, timeout_s=180)
    assert {t: p.state for t, p in done.items()} == dict.fromkeys(before, "verified")
    judges = Counter(e.producer_id for e in net.events("TaskVerified"))
    shards = {w: [u for u in us if u.startswith("verifier")] for w, us in held.items()}
    for worker, mine in shards.items():
        assert (judges[worker] > 0) == bool(mine), (judges, held)

    # Tasks in flight, then the worker holding two units (a verifier shard among them)
    # dies: the other takes over every unit.
    victim = max(held, key=lambda w: len(held[w]))
    survivor = next(w for w in held if w != victim)
    inflight = submit(16, 100)
    deadline = time.monotonic() + 60
    while not any(e.fields["task_id"] in inflight for e in net.events("TaskAssigned")):
        assert time.monotonic() < deadline, "nothing was assigned"
        time.sleep(0.05)
    killed_at = time.monotonic()
    net.kill(victim, signal.SIGKILL)
    _wait_holders(net, {survivor}, 30)
    moved_s = time.monotonic() - killed_at
    print(f"killed {victim} (held {held[victim]}); {survivor} held every unit "
          f"{moved_s:.1f} s later")
    done = client.wait(inflight, watch=watch, timeout_s=240)
    assert {t: p.state for t, p in done.items()} == dict.fromkeys(inflight, "verified"), (
        [e.fields for e in net.events("TaskFailed")],
        [(e.fields["reason"], e.fields["source_topic"]) for e in net.events("DeadLettered")])
    # The dead worker's tasks in flight were judged by the survivor (a few may have been
    # judged before the kill, by the dead one).
    verdicts = {e.fields["task_id"]: e.producer_id for e in net.events("TaskVerified")}
    theirs = [t for t in inflight if any(
        Shard(int(u[len("verifier-")]), 2).owns(t) for u in held[victim] if u != "allocator")]
    assert theirs, "no task in flight on the killed worker's shards"
    taken_over = [t for t in theirs if verdicts[t] == survivor]
    assert len(taken_over) >= len(theirs) // 2, (verdicts, theirs)

    # A task submitted now is placed and judged by the survivor alone.
    last = submit(1, 200)
    assert client.wait(last, watch=watch, timeout_s=120)[last[0]].state == "verified"
    watch.close()
    client.close()

    # Exactly once across the handovers: one verdict per task, one assignment per replica.
    every = [*before, *inflight, *last]
    assert Counter(e.fields["task_id"] for e in net.events("TaskVerified")) == Counter(
        dict.fromkeys(every, 1))
    replicas = Counter((e.fields["task_id"], e.fields["replica_index"], e.fields["attempt"])
                       for e in net.events("TaskAssigned"))
    assert max(replicas.values()) == 1
    misrouted = [e for e in net.events("DeadLettered") if "misrouted" in e.fields["reason"]]
    assert not misrouted
