"""Every service's ``/metrics`` on a live network: the figures match the tasks run.

The ledger processor, the projector, the processors worker and two node runners each
serve their metrics on a free port, print it and record it in ``$DESTRA_HOME/metrics``
(``streams.metrics``); after N tasks reach their verdicts the scrapes must agree with
what happened: N verdicts handled by the ledger and emitted by the verifier, every escrow
back to zero, N x replicas replicas run on the nodes, no dead letters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from destra.client import Client
from destra.network import LocalNetwork
from destra.settings import Settings
from infra import services
from ledger.processor import wait_for_transactions
from streams.metrics import registered
from tests.support import running_network, scrape, total

pytestmark = pytest.mark.integration

TASKS = 4
REPLICAS = 2
NODES = ("m0", "m1")
SERVICES = {"ledger-processor", "projector", "processors", "node-m0", "node-m1"}


@pytest.fixture
def net(network: Settings, kafka: str, pg_dsn: str, tmp_path: Path) -> Iterator[LocalNetwork]:
    with running_network(network.with_(home=tmp_path / "home"), kafka, pg_dsn, tmp_path,
                         {"DESTRA_METRICS_PORT": "0"}) as net:
        yield net


def until(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_every_service_scrape_matches_the_tasks_run(net: LocalNetwork) -> None:
    net.mint("alice")
    net.start_services()
    for name in NODES:
        net.start_node(name, slots=2)
    net.wait_registered(list(NODES))
    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    watch = client.watch()
    try:
        ids = [client.submit(client.quote("nbody", {"n": "64", "steps": "20", "seed": str(i)},
                                          replicas=REPLICAS, quorum=REPLICAS))
               for i in range(TASKS)]
        done = client.wait(ids, watch=watch, timeout_s=300)
    finally:
        watch.close()
        client.close()
    assert {t: p.state for t, p in done.items()} == dict.fromkeys(ids, "verified")
    wait_for_transactions(net.settings, net.bootstrap, [f"settle/{t}" for t in ids])
    net.check_alive()

    # Each service recorded where its metrics are, and infra status lists them.
    until(lambda: SERVICES <= {e["name"] for e in registered(net.settings.home)})
    found = {e["name"]: e for e in registered(net.settings.home)}
    status = services.status(net.settings)
    assert SERVICES <= {e["name"] for e in status["metrics"]}
    json.dumps(status)  # --json prints it as it is
    for name in SERVICES:
        assert f"metrics: {found[name]['url']}" in net.log(name), name

    ledger = scrape(found["ledger-processor"]["url"])
    assert total(ledger, "destra_events_handled_total", processor="ledger",
                 event="TaskVerified") == TASKS
    assert total(ledger, "destra_events_handled_total", processor="ledger",
                 event="TaskSubmitted") == TASKS
    assert total(ledger, "destra_handler_seconds_count", processor="ledger") >= 2 * TASKS
    assert total(ledger, "destra_ledger_micro", account="escrow") == 0
    assert total(ledger, "destra_ledger_micro", account="escrow-tasks") == 0
    assert total(ledger, "destra_ledger_micro", account="treasury") > 0  # the fees
    assert total(ledger, "destra_batches_total") > 0
    assert any(n == "destra_consumer_lag" for n, _, _ in ledger)

    processors = scrape(found["processors"]["url"])
    assert total(processors, "destra_events_emitted_total", event="TaskVerified") == TASKS
    assert total(processors, "destra_events_emitted_total",
                 event="TaskAssigned") == TASKS * REPLICAS
    assert total(processors, "destra_events_handled_total", processor="allocator",
                 event="TaskSubmitted") == TASKS
    assert total(processors, "destra_events_handled_total", processor="verifier",
                 event="ResultRevealed") == TASKS * REPLICAS

    nodes = [scrape(found[f"node-{n}"]["url"]) for n in NODES]
    assert sum(total(s, "destra_node_tasks_run_total", workload="nbody")
               for s in nodes) == TASKS * REPLICAS
    assert sum(total(s, "destra_node_compute_seconds_total") for s in nodes) > 0
    # Each replica's assignment and its reveal call reached a node's handler; each
    # replica's commit and reveal left it.
    assert sum(total(s, "destra_events_handled_total", processor="node",
                     event="TaskAssigned") for s in nodes) == TASKS * REPLICAS
    assert sum(total(s, "destra_events_emitted_total", event="ResultCommitted")
               for s in nodes) == TASKS * REPLICAS
    assert sum(total(s, "destra_events_emitted_total", event="ResultRevealed")
               for s in nodes) == TASKS * REPLICAS

    def projected() -> bool:
        projector = scrape(found["projector"]["url"])
        return total(projector, "destra_tasks", status="verified") == TASKS

    until(projected)
    projector = scrape(found["projector"]["url"])
    assert total(projector, "destra_projected_records_total") > 0
    assert sum(total(projector, "destra_tasks", status=s)
               for s in ("submitted", "escrowed", "assigned", "committing", "revealing",
                         "failed")) == 0

    everyone = [*nodes, ledger, processors, projector]
    assert sum(total(s, "destra_dead_letters_total") for s in everyone) == 0

    # The services' lines about tasks are JSON with the task's id.
    lines = [json.loads(line) for line in net.log("processors").splitlines()
             if line.startswith("{")]
    placed = {rec["task_id"] for rec in lines if rec["message"].startswith("TaskAssigned")}
    assert placed == set(ids)
    ran = [json.loads(line) for n in NODES for line in net.log(f"node-{n}").splitlines()
           if line.startswith("{")]
    assert sorted(r["task_id"] for r in ran if r["message"].startswith("ran ")) == sorted(
        t for t in ids for _ in range(REPLICAS))
